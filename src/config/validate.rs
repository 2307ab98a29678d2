//! Checks on a resolved [`Config`]: every problem, each with its fix. Settings are
//! named as TOML key and flag (`postgres.slot / --slot`), so either can be fixed.

use std::collections::HashSet;
use std::time::Duration;

use super::units::{format_byte_size, format_duration};
use super::{
    conninfo, Config, Problem, ENV_PREFIX, MAX_IDENTIFIER_BYTES, TOPIC_TEMPLATE_PLACEHOLDER,
};

/// Replication messages of up to this size are accepted at most: PostgreSQL cannot
/// build a bigger one (its allocations stop at 1 GiB).
pub const MAX_FRAME_BYTES_LIMIT: usize = 1 << 30;
pub const MIN_FRAME_BYTES: usize = 64 << 10;
/// Well under PostgreSQL's default `wal_sender_timeout` (60 s).
pub const MAX_STATUS_INTERVAL: Duration = Duration::from_secs(30);
/// Kafka's limit on topic names.
const MAX_TOPIC_LEN: usize = 249;

pub(super) fn validate(cfg: &Config) -> Vec<Problem> {
    let mut out = Vec::new();
    postgres(cfg, &mut out);
    kafka(cfg, &mut out);
    mapping(cfg, &mut out);
    crate::envelope::validate(cfg, &mut out);
    crate::trace::validate(cfg, &mut out);
    relay(cfg, &mut out);
    http(cfg, &mut out);
    log(cfg, &mut out);
    out
}

fn setting(key: &str, flag: &str) -> String {
    let env = format!(
        "{ENV_PREFIX}{}",
        flag.to_ascii_uppercase().replace('-', "_")
    );
    format!("{key} (--{flag}, {env})")
}

fn postgres(cfg: &Config, out: &mut Vec<Problem>) {
    let p = &cfg.postgres;
    if p.url.trim().is_empty() {
        out.push(Problem::new(
            "the PostgreSQL connection is not set",
            format!(
                "set {}, e.g. postgres://relay@db.example:5432/app",
                setting("postgres.url", "postgres-url")
            ),
        ));
    } else {
        match conninfo::parse(&p.url, p.password.as_deref()) {
            Err(problem) => out.push(problem),
            Ok(pg) => out.extend(conninfo::endpoint(&pg).err().unwrap_or_default()),
        }
    }
    // ReplicationSlotValidateName: lower-case letters, digits and underscores.
    let slot_ok = !p.slot.is_empty()
        && p.slot.len() <= MAX_IDENTIFIER_BYTES
        && p.slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !slot_ok {
        out.push(Problem::new(
            format!("slot name {:?} is not a valid replication slot name", p.slot),
            format!(
                "set {} to lower-case letters, digits and underscores, at most {MAX_IDENTIFIER_BYTES} characters",
                setting("postgres.slot", "slot")
            ),
        ));
    }
    if p.publication.is_empty() || p.publication.len() > MAX_IDENTIFIER_BYTES {
        out.push(Problem::new(
            format!(
                "publication name {:?} is empty or longer than {MAX_IDENTIFIER_BYTES} bytes",
                p.publication
            ),
            format!(
                "set {} to a name of 1 to {MAX_IDENTIFIER_BYTES} bytes",
                setting("postgres.publication", "publication")
            ),
        ));
    }
    let app = &p.application_name;
    if app.is_empty()
        || app.len() > MAX_IDENTIFIER_BYTES
        || !app.bytes().all(|b| (0x20..0x7f).contains(&b))
    {
        out.push(Problem::new(
            format!("application_name {app:?} is empty, longer than {MAX_IDENTIFIER_BYTES} characters or not printable ASCII"),
            format!(
                "set {} to printable ASCII of 1 to {MAX_IDENTIFIER_BYTES} characters (PostgreSQL \
                 would alter it, and the slot-holder check compares it)",
                setting("postgres.application_name", "application-name")
            ),
        ));
    }
    if p.status_interval.is_zero() || p.status_interval > MAX_STATUS_INTERVAL {
        out.push(Problem::new(
            format!(
                "status_interval {} is outside 1ms..{}",
                format_duration(p.status_interval),
                format_duration(MAX_STATUS_INTERVAL)
            ),
            format!(
                "set {} to a value well under the server's wal_sender_timeout, e.g. 1s",
                setting("postgres.status_interval", "status-interval")
            ),
        ));
    }
    if p.connect_timeout.is_zero() {
        out.push(Problem::new(
            "connect_timeout is 0",
            format!(
                "set {} to e.g. 10s",
                setting("postgres.connect_timeout", "connect-timeout")
            ),
        ));
    }
    if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES_LIMIT).contains(&p.max_frame_bytes) {
        out.push(Problem::new(
            format!(
                "max_frame_bytes {} is outside {}..{}",
                p.max_frame_bytes,
                format_byte_size(MIN_FRAME_BYTES),
                format_byte_size(MAX_FRAME_BYTES_LIMIT)
            ),
            format!(
                "set {} to at least your largest row, e.g. 64MiB",
                setting("postgres.max_frame_bytes", "max-frame-bytes")
            ),
        ));
    }
}

fn kafka(cfg: &Config, out: &mut Vec<Problem>) {
    let k = &cfg.kafka;
    if k.brokers.trim().is_empty() {
        out.push(Problem::new(
            "no Kafka brokers are set",
            format!(
                "set {}, e.g. kafka1:9092,kafka2:9092",
                setting("kafka.brokers", "kafka-brokers")
            ),
        ));
    } else if k
        .brokers
        .split(',')
        .any(|b| b.trim().is_empty() || b.trim().contains(char::is_whitespace))
    {
        out.push(Problem::new(
            format!(
                "kafka.brokers {:?} has an empty or blank-containing entry",
                k.brokers
            ),
            "write host:port entries separated by commas, e.g. kafka1:9092,kafka2:9092",
        ));
    }
    if k.topic_partitions < 1 {
        out.push(Problem::new(
            format!("topic_partitions is {}", k.topic_partitions),
            format!(
                "set {} to 1 or more",
                setting("kafka.topic_partitions", "topic-partitions")
            ),
        ));
    }
    if k.topic_replication_factor < 1 && k.topic_replication_factor != -1 {
        out.push(Problem::new(
            format!("topic_replication_factor is {}", k.topic_replication_factor),
            format!(
                "set {} to 1 or more, or -1 for the broker's default",
                setting("kafka.topic_replication_factor", "topic-replication-factor")
            ),
        ));
    }
    for (key, value) in &k.properties {
        let key_lc = key.trim().to_ascii_lowercase();
        let v = value.trim().to_ascii_lowercase();
        let problem = match key_lc.as_str() {
            "" => Some(("an empty Kafka property name".to_string(), "remove it".to_string())),
            _ if key.trim() != key || key.contains(char::is_whitespace) => Some((
                format!("Kafka property name {key:?} contains blanks"),
                "write the librdkafka name exactly, e.g. compression.type".to_string(),
            )),
            "bootstrap.servers" | "metadata.broker.list" => Some((
                format!("Kafka property {key} duplicates the broker list"),
                format!("remove it and set {}", setting("kafka.brokers", "kafka-brokers")),
            )),
            "acks" | "request.required.acks" if v != "all" && v != "-1" => Some((
                format!("Kafka property {key}={value} weakens delivery: the relay confirms the slot only after acks=all"),
                format!("remove {key} (the relay sets acks=all)"),
            )),
            "enable.idempotence" if v != "true" => Some((
                format!("Kafka property {key}={value} allows duplicates and reordering on retry"),
                format!("remove {key} (the relay enables idempotence)"),
            )),
            // The relay confirms the slot from delivery reports: every record needs one.
            "delivery.report.only.error" if v != "false" => Some((
                format!("Kafka property {key}={value} suppresses the delivery reports of acknowledged records, so the relay would never confirm the slot"),
                format!("remove {key}"),
            )),
            // A hand-set transactional.id turns on transactions the relay never
            // commits, and fences the other relay of a standby pair.
            "transactional.id" => Some((
                format!("Kafka property {key} is set: the relay does not use Kafka transactions, and records produced under it would never be committed"),
                format!("remove {key} (the relay's idempotent producer keeps order and avoids duplicates without it)"),
            )),
            "max.in.flight.requests.per.connection" | "max.in.flight"
                if v.parse::<u64>().map_or(true, |n| n == 0 || n > 5) =>
            {
                Some((
                    format!("Kafka property {key}={value}: the idempotent producer keeps per-key order only with 1 to 5 requests in flight per connection"),
                    format!("set {key} between 1 and 5, or remove it (librdkafka's default with idempotence is 5)"),
                ))
            }
            _ => None,
        };
        if let Some((what, fix)) = problem {
            out.push(Problem::new(what, fix));
        }
    }
}

fn mapping(cfg: &Config, out: &mut Vec<Problem>) {
    let m = &cfg.mapping;
    if m.message_prefix.as_deref() == Some("") {
        out.push(Problem::new(
            "the message prefix is empty",
            format!(
                "set {} to a prefix such as outbox, or turn messages off with {}",
                setting("mapping.message_prefix", "message-prefix"),
                setting("mapping.messages = false", "no-messages")
            ),
        ));
    }
    let mut columns = vec![
        ("mapping.id_column", "id-column", &m.id_column),
        ("mapping.key_column", "key-column", &m.key_column),
        (
            "mapping.payload_column",
            "payload-column",
            &m.payload_column,
        ),
    ];
    if m.topic.is_none() {
        columns.push(("mapping.route_column", "route-column", &m.route_column));
    }
    for (key, flag, column) in columns {
        if column.trim().is_empty() {
            out.push(Problem::new(
                format!("{key} is empty"),
                format!("set {} to a column name", setting(key, flag)),
            ));
        }
    }
    let mut seen = HashSet::new();
    for column in &m.header_columns {
        if column.trim().is_empty() {
            out.push(Problem::new(
                "mapping.header_columns contains an empty name",
                "remove it from header_columns / --header-column",
            ));
        } else if !seen.insert(column) {
            out.push(Problem::new(
                format!("mapping.header_columns lists {column:?} twice"),
                "list each header column once",
            ));
        }
    }
    match &m.topic {
        Some(topic) => {
            if let Err(why) = check_topic_chars(topic, true) {
                out.push(Problem::new(
                    format!("topic {topic:?} is not a valid Kafka topic name: {why}"),
                    format!(
                        "set {} to letters, digits, '.', '_' and '-' (at most {MAX_TOPIC_LEN})",
                        setting("mapping.topic", "topic")
                    ),
                ));
            }
        }
        None => {
            let template = &m.topic_template;
            let literal = template.replace(TOPIC_TEMPLATE_PLACEHOLDER, "");
            let why = if literal.contains("${") || literal.contains('$') {
                Some(format!(
                    "the only placeholder is {TOPIC_TEMPLATE_PLACEHOLDER}"
                ))
            } else if template.is_empty() {
                Some("it is empty".to_string())
            } else {
                check_topic_chars(&literal, false).err()
            };
            if let Some(why) = why {
                out.push(Problem::new(
                    format!("topic_template {template:?} cannot make valid topic names: {why}"),
                    format!(
                        "set {} to letters, digits, '.', '_', '-' and {TOPIC_TEMPLATE_PLACEHOLDER}, e.g. {}",
                        setting("mapping.topic_template", "topic-template"),
                        super::DEFAULT_TOPIC_TEMPLATE
                    ),
                ));
            }
        }
    }
}

/// Kafka's rule: `[a-zA-Z0-9._-]`, at most 249, not `.` or `..`.
fn check_topic_chars(name: &str, whole: bool) -> Result<(), String> {
    if whole && name.is_empty() {
        return Err("it is empty".into());
    }
    if whole && (name == "." || name == "..") {
        return Err("'.' and '..' are reserved".into());
    }
    if name.len() > MAX_TOPIC_LEN {
        return Err(format!("it is longer than {MAX_TOPIC_LEN} characters"));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(format!("{c:?} is not allowed")),
        None => Ok(()),
    }
}

fn relay(cfg: &Config, out: &mut Vec<Problem>) {
    let r = &cfg.relay;
    if r.max_in_flight_records == 0 {
        out.push(Problem::new(
            "max_in_flight_records is 0",
            format!(
                "set {} to 1 or more",
                setting("relay.max_in_flight_records", "max-in-flight-records")
            ),
        ));
    }
    if r.max_in_flight_bytes == 0 {
        out.push(Problem::new(
            "max_in_flight_bytes is 0",
            format!(
                "set {} to e.g. 64MiB",
                setting("relay.max_in_flight_bytes", "max-in-flight-bytes")
            ),
        ));
    }
    if r.reconnect_backoff_min.is_zero() {
        out.push(Problem::new(
            "reconnect_backoff_min is 0, so reconnects would spin",
            format!(
                "set {} to e.g. 500ms",
                setting("relay.reconnect_backoff_min", "reconnect-backoff-min")
            ),
        ));
    }
    if r.reconnect_backoff_min > r.reconnect_backoff_max {
        out.push(Problem::new(
            format!(
                "reconnect_backoff_min ({}) is above reconnect_backoff_max ({})",
                format_duration(r.reconnect_backoff_min),
                format_duration(r.reconnect_backoff_max)
            ),
            format!(
                "make {} at most {}",
                setting("relay.reconnect_backoff_min", "reconnect-backoff-min"),
                setting("relay.reconnect_backoff_max", "reconnect-backoff-max")
            ),
        ));
    }
}

pub(super) fn poison(
    layer_policies: Option<&std::collections::BTreeMap<String, String>>,
    cfg: &Config,
    out: &mut Vec<Problem>,
) {
    for (class, policy) in layer_policies.into_iter().flatten() {
        if class != "*" && !crate::config::POISON_CLASSES.contains(&class.as_str()) {
            out.push(Problem::new(
                format!("unknown poison class {class:?}"),
                format!("use one of {}", crate::config::POISON_CLASSES.join(", ")),
            ));
        }
        if let Err(e) = policy.parse::<crate::config::PoisonPolicy>() {
            out.push(Problem::new(
                e,
                format!("fix {}", setting("relay.poison_policy", "poison-policy")),
            ));
        }
    }
    let uses_dead_letter = crate::config::POISON_CLASSES
        .iter()
        .any(|c| cfg.relay.poison_policy(c) == crate::config::PoisonPolicy::DeadLetter);
    if uses_dead_letter && cfg.relay.dead_letter_topic.is_none() {
        out.push(Problem::new(
            "a poison policy is dead-letter but no dead-letter topic is set",
            format!(
                "set {}",
                setting("relay.dead_letter_topic", "dead-letter-topic")
            ),
        ));
    }
}

fn http(cfg: &Config, out: &mut Vec<Problem>) {
    let listen = &cfg.relay.http_listen;
    if cfg.relay.http_listen_addr().is_none() && !listen.eq_ignore_ascii_case("off") {
        out.push(Problem::new(
            format!("http_listen {listen:?} is not an address"),
            format!(
                "set {} to host:port (e.g. 127.0.0.1:9187) or off",
                setting("relay.http_listen", "http-listen")
            ),
        ));
    }
}

fn log(cfg: &Config, out: &mut Vec<Problem>) {
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&cfg.log.filter) {
        out.push(Problem::new(
            format!("log filter {:?} is not valid: {e}", cfg.log.filter),
            format!(
                "set {} to directives like info or info,outbox_relay=debug",
                setting("log.filter", "log-filter")
            ),
        ));
    }
}
