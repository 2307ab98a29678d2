//! `check`'s Kafka half: contact the brokers with the relay's own client
//! settings (security included), and judge the topics the mapping will use
//! when they can be known before the first row:
//!
//! * a fixed `--topic`, and the `--dead-letter-topic`: each must exist, or be
//!   creatable when topic creation is on, asked with a *validate-only*
//!   CreateTopics request (Apache Kafka checks name, settings and authorization
//!   and creates nothing; a broker that ignores the flag, such as tansu 0.6,
//!   creates the topic, with the settings the relay would use at its first
//!   record anyway);
//! * a topic template (`outbox.event.${routedByValue}`): the names depend on the
//!   rows, so `check` cannot list them. With creation off it says the topics
//!   must exist; with creation on it asks nothing (a probe topic would be left
//!   behind on a broker that ignores validate-only).
//!
//! What it does not check: the producer's idempotence permission
//! (`IDEMPOTENT_WRITE` on old clusters) and `min.insync.replicas`; the first
//! produce request shows those.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use crate::config::{Config, Problem};
use crate::kafka::SinkSettings;

/// How long `check` waits for the brokers.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Placeholder of the topic template.
const ROUTED_BY_VALUE: &str = "${routedByValue}";

/// Everything `check` has to say about Kafka (errors and notes).
pub async fn diagnose_kafka(cfg: &Config) -> Vec<Problem> {
    let settings = SinkSettings::from_config(cfg);
    let admin: AdminClient<DefaultClientContext> = match settings.client_config().create() {
        Ok(a) => a,
        Err(e) => {
            return vec![Problem::new(
                format!("the Kafka client cannot be built from the settings: {e}"),
                "fix the kafka properties named in the message",
            )]
        }
    };
    let brokers = cfg.kafka.brokers.clone();
    // fetch_metadata blocks; keep it off the runtime's threads.
    let (admin, metadata) = match tokio::task::spawn_blocking(move || {
        let m = admin.inner().fetch_metadata(None, TIMEOUT);
        (admin, m)
    })
    .await
    {
        Ok(r) => r,
        Err(e) => {
            return vec![Problem::new(
                format!("asking Kafka for its metadata failed: {e}"),
                "run check again",
            )]
        }
    };
    let metadata = match metadata {
        Ok(m) => m,
        Err(e) => {
            return vec![Problem::new(
                format!("cannot reach Kafka at {brokers}: {e}"),
                "check --kafka-brokers (host:port of the brokers' listeners), the network path, \
                 and the security settings (--kafka-security-protocol, TLS, SASL)",
            )]
        }
    };
    let existing: Vec<String> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| t.name().to_string())
        .collect();
    tracing::debug!(
        brokers = metadata.brokers().len(),
        topics = existing.len(),
        "kafka metadata"
    );

    let mut out = Vec::new();
    let mut fixed: Vec<(&str, String)> = Vec::new();
    if let Some(t) = &cfg.mapping.topic {
        fixed.push(("topic", t.clone()));
    }
    if let Some(t) = &cfg.relay.dead_letter_topic {
        fixed.push(("dead-letter topic", t.clone()));
    }
    for (what, topic) in &fixed {
        if existing.iter().any(|e| e == topic) {
            continue;
        }
        if !cfg.kafka.create_topics {
            out.push(Problem::new(
                format!("the {what} {topic:?} does not exist in Kafka and topic creation is off"),
                format!("create topic {topic:?}, or drop --no-create-topics"),
            ));
        } else if let Err(reason) = can_create(&admin, &settings, topic).await {
            out.push(Problem::new(
                format!(
                    "the {what} {topic:?} does not exist and Kafka refuses to create it: {reason}"
                ),
                format!(
                    "create topic {topic:?} as an administrator, or grant the relay's principal \
                     CREATE on it"
                ),
            ));
        }
    }
    if cfg.mapping.topic.is_none() && cfg.mapping.topic_template.contains(ROUTED_BY_VALUE) {
        let template = &cfg.mapping.topic_template;
        if !cfg.kafka.create_topics {
            out.push(Problem::info(
                format!(
                    "topics are named by the template {template:?} from each row's routing value, \
                     so check cannot list them, and topic creation is off"
                ),
                "make sure a topic exists for every routing value before rows with it arrive",
            ));
        }
    }
    drop_off_runtime(admin).await;
    out
}

/// A validate-only CreateTopics request: `Ok` when the broker would create it.
async fn can_create(
    admin: &AdminClient<DefaultClientContext>,
    settings: &SinkSettings,
    topic: &str,
) -> Result<(), String> {
    let replication = TopicReplication::Fixed(settings.topic_replication_factor);
    let new = NewTopic::new(topic, settings.topic_partitions, replication);
    let opts = AdminOptions::new()
        .validate_only(true)
        .operation_timeout(Some(TIMEOUT))
        .request_timeout(Some(TIMEOUT + Duration::from_secs(5)));
    let results = admin
        .create_topics([&new], &opts)
        .await
        .map_err(|e| e.to_string())?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(format!("{code:?} ({code})")),
        }
    }
    Ok(())
}

/// Dropping an rdkafka client joins its threads: not on the async runtime.
async fn drop_off_runtime(admin: AdminClient<DefaultClientContext>) {
    let _ = tokio::task::spawn_blocking(move || drop(admin)).await;
}
