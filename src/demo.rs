//! `outbox-relay demo`: the whole pipeline in one process, in seconds.
//!
//! A real PostgreSQL (given by URL; `scripts/demo.sh` starts a throwaway one)
//! and, as the broker, **librdkafka's built-in mock cluster**: an in-process,
//! in-memory Kafka-protocol broker, clearly a demo stand-in so a fresh
//! machine need not build or install a broker. The relay runs exactly as in
//! `run`; a writer inserts sample outbox events; a consumer reads them back
//! from the mock broker and prints each with its commit → Kafka latency.

use std::time::{Duration, SystemTime};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::outbox::HEADER_COMMIT_TIME;
use crate::relay::{Relay, RelayError};

/// Sample aggregates the writer cycles through.
const AGGREGATES: &[(&str, &str)] = &[
    ("Order", "OrderCreated"),
    ("Customer", "CustomerRegistered"),
    ("Payment", "PaymentCaptured"),
];

/// Options of the demo command.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Events per second the writer inserts.
    pub rate: u32,
    /// Stop after this many events arrived (None: until Ctrl-C).
    pub count: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the demo broker (librdkafka mock cluster): {0}")]
    Broker(rdkafka::error::KafkaError),
    #[error("demo consumer: {0}")]
    Consumer(rdkafka::error::KafkaError),
    #[error("demo writer: {0}; does the database have the outbox table? (psql -f sql/01_outbox_table.sql)")]
    Writer(tokio_postgres::Error),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Run the demo until Ctrl-C (`shutdown`) or `count` events arrived.
pub async fn run(
    mut cfg: Config,
    opts: DemoOptions,
    shutdown: CancellationToken,
) -> Result<(), DemoError> {
    let cluster = MockCluster::new(1).map_err(DemoError::Broker)?;
    let bootstrap = cluster.bootstrap_servers();
    println!("demo broker: librdkafka mock cluster at {bootstrap} (in-process, in-memory; use a real Kafka with `outbox-relay run`)");
    cfg.kafka.brokers = bootstrap.clone();
    // The mock cluster does not serve the admin API's CreateTopics; make the
    // demo's topics on the cluster itself and let the relay only check them.
    cfg.kafka.create_topics = false;

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "outbox-relay-demo")
        .set("enable.auto.commit", "false")
        // Show each event as soon as the broker has it.
        .set("fetch.wait.max.ms", "5")
        .set("fetch.min.bytes", "1")
        .create()
        .map_err(DemoError::Consumer)?;
    let topics: Vec<String> = AGGREGATES
        .iter()
        .map(|(agg, _)| {
            cfg.mapping
                .topic
                .clone()
                .unwrap_or_else(|| cfg.mapping.topic_template.replace("${routedByValue}", agg))
        })
        .collect();

    for topic in &topics {
        cluster
            .create_topic(topic, 1, 1)
            .map_err(DemoError::Broker)?;
    }

    let relay_stop = CancellationToken::new();
    let relay = tokio::spawn(Relay::new(cfg.clone(), relay_stop.clone()).run());
    let writer_stop = CancellationToken::new();
    let writer = tokio::spawn(write_events(cfg.clone(), opts.rate, writer_stop.clone()));

    let mut latencies_us: Vec<u64> = Vec::new();
    // The topics exist already: read them directly (no consumer-group join).
    let mut assignment = rdkafka::TopicPartitionList::new();
    for topic in &topics {
        assignment
            .add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
            .map_err(DemoError::Consumer)?;
    }
    consumer.assign(&assignment).map_err(DemoError::Consumer)?;
    let started = std::time::Instant::now();
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            r = consumer.recv() => match r {
                Err(e) => tracing::debug!(error = %e, "demo consumer"),
                Ok(m) => {
                    let now = SystemTime::now();
                    let commit = m.headers().and_then(|h| {
                        h.iter()
                            .find(|h| h.key == HEADER_COMMIT_TIME)
                            .and_then(|h| h.value)
                            .and_then(|v| std::str::from_utf8(v).ok())
                            .and_then(|s| humantime::parse_rfc3339(s).ok())
                    });
                    let latency = commit.and_then(|c| now.duration_since(c).ok()).unwrap_or_default();
                    latencies_us.push(latency.as_micros() as u64);
                    let id = m
                        .headers()
                        .and_then(|h| h.iter().find(|h| h.key == "id").and_then(|h| h.value))
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default();
                    println!(
                        "{:>6} {:<24} key={:<14} id={} latency={:.2} ms payload={}",
                        latencies_us.len(),
                        m.topic(),
                        String::from_utf8_lossy(m.key().unwrap_or_default()),
                        id,
                        latency.as_secs_f64() * 1000.0,
                        String::from_utf8_lossy(m.payload().unwrap_or_default()),
                    );
                    if opts.count.is_some_and(|c| latencies_us.len() as u64 >= c) {
                        break Ok(());
                    }
                }
            },
        }
        if relay.is_finished() {
            break Err(());
        }
    };

    writer_stop.cancel();
    let _ = writer.await;
    relay_stop.cancel();
    let relay_result = relay.await.expect("relay task does not panic");
    drop(consumer);
    drop(cluster);
    print_summary(&mut latencies_us, started.elapsed());
    match (result, relay_result) {
        (_, Err(e)) => Err(e.into()),
        _ => Ok(()),
    }
}

async fn write_events(cfg: Config, rate: u32, stop: CancellationToken) -> Result<(), DemoError> {
    let client = crate::sql::connect(&cfg.postgres)
        .await
        .map_err(|e| match e {
            crate::sql::SqlConnectError::Postgres(e) => DemoError::Writer(e),
            crate::sql::SqlConnectError::Config(e) => DemoError::Config(e.to_string()),
            crate::sql::SqlConnectError::NoServer(e) => DemoError::Config(e),
        })?;
    let table = cfg.postgres.table.to_string();
    let insert = client
        .prepare(&format!(
            "INSERT INTO {table} (aggregatetype, aggregateid, type, payload) VALUES ($1, $2, $3, $4::text::jsonb)"
        ))
        .await
        .map_err(DemoError::Writer)?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        n += 1;
        let (agg, kind) = AGGREGATES[(n % AGGREGATES.len() as u64) as usize];
        let key = format!("{}-{}", agg.to_lowercase(), n % 7);
        let payload = format!(r#"{{"seq": {n}, "note": "demo event ✓"}}"#);
        client
            .execute(&insert, &[&agg, &key, &kind, &payload])
            .await
            .map_err(DemoError::Writer)?;
    }
}

fn print_summary(latencies_us: &mut [u64], elapsed: Duration) {
    if latencies_us.is_empty() {
        println!("no events arrived");
        return;
    }
    println!(
        "\n{} events in {:.1} s; commit → consumer latency: {}",
        latencies_us.len(),
        elapsed.as_secs_f64(),
        percentiles(&mut latencies_us.to_vec())
    );
    // The first events also pay for connection set-up (producer id, topic
    // metadata); the steady state is what an operator sees afterwards.
    let warm_up = WARM_UP_EVENTS.min(latencies_us.len() / 2);
    if warm_up > 0 {
        println!(
            "after the first {warm_up} (connection set-up): {}",
            percentiles(&mut latencies_us[warm_up..].to_vec())
        );
    }
}

/// Events counted as warm-up in the demo's summary.
const WARM_UP_EVENTS: usize = 50;

fn percentiles(sorted: &mut [u64]) -> String {
    sorted.sort_unstable();
    let pct = |p: f64| {
        let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[idx] as f64 / 1000.0
    };
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    )
}
