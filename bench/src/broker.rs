//! The broker a benchmark run measures against: tansu (the default, a real
//! Kafka-protocol broker from the test kit) or librdkafka's mock cluster hosted
//! in this process (`--broker mock`), an ideal broker that answers at once, to
//! measure the relay apart from tansu. Either way the relay and the raw producer
//! connect to it over TCP like to any broker.

use std::path::PathBuf;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};

/// Which broker (`--broker`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// tansu 0.6 with memory storage, a separate process
    Tansu,
    /// librdkafka's mock cluster in the benchmark's process
    Mock,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Tansu => "tansu",
            Kind::Mock => "mock",
        })
    }
}

/// What a broker of `kind` is, for the report.
pub fn describe(kind: Kind) -> String {
    match kind {
        Kind::Tansu => {
            let v = std::process::Command::new(testkit::tansu_binary())
                .arg("--version")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            format!("{v} (memory storage)")
        }
        Kind::Mock => format!(
            "librdkafka {} mock cluster (in the benchmark's process)",
            rdkafka::util::get_rdkafka_version().1
        ),
    }
}

pub enum Broker {
    Tansu(testkit::Broker),
    Mock(MockCluster<'static, DefaultProducerContext>),
}

impl Broker {
    /// Starts a broker of `kind` (for tansu: the test kit's, memory storage).
    pub fn start(kind: Kind) -> Result<Broker, String> {
        match kind {
            Kind::Tansu => Ok(Broker::Tansu(testkit::Broker::start_memory())),
            // One broker: the relay's producer sees one leader, as with tansu.
            Kind::Mock => MockCluster::new(1)
                .map(Broker::Mock)
                .map_err(|e| format!("start librdkafka's mock cluster: {e}")),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Broker::Tansu(_) => Kind::Tansu,
            Broker::Mock(_) => Kind::Mock,
        }
    }

    pub fn bootstrap(&self) -> String {
        match self {
            Broker::Tansu(b) => b.bootstrap(),
            Broker::Mock(m) => m.bootstrap_servers(),
        }
    }

    /// The broker's own process, when it has one (the mock runs in ours).
    pub fn pid(&self) -> Option<u32> {
        match self {
            Broker::Tansu(b) => b.pid(),
            Broker::Mock(_) => None,
        }
    }

    pub fn log_path(&self) -> Option<PathBuf> {
        match self {
            Broker::Tansu(b) => Some(b.log_path()),
            Broker::Mock(_) => None,
        }
    }

    pub fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", self.bootstrap());
        cfg
    }

    /// Creates `topic` with one partition (an existing one is fine) and waits
    /// until metadata shows it.
    pub async fn create_topic(&self, topic: &str) -> Result<(), String> {
        match self {
            Broker::Tansu(b) => match b.try_create_topic(topic, 1).await {
                Err(e) if !e.contains("TopicAlreadyExists") => Err(e),
                _ => Ok(()),
            },
            Broker::Mock(m) => m
                .create_topic(topic, 1, 1)
                .map_err(|e| format!("create topic {topic} on the mock cluster: {e}")),
        }
    }

    /// Deletes topics to give tansu its memory back; errors are ignored.
    pub async fn delete_topics(&self, topics: &[String]) {
        if let Broker::Tansu(b) = self {
            b.delete_topics(topics).await;
        }
    }

    /// A few idempotent produces to a scratch topic: tansu's first is slow.
    pub async fn warm_up(&self) -> Result<(), String> {
        let topic = "bench.warm_up";
        self.create_topic(topic).await?;
        let producer: FutureProducer = self
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .map_err(|e| format!("create a producer: {e}"))?;
        for _ in 0..3 {
            producer
                .send(
                    FutureRecord::to(topic).key("k").payload("warm-up"),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| format!("warm-up produce: {e}"))?;
        }
        Ok(())
    }
}
