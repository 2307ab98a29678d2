//! Layers of settings: the TOML file's schema, the flags' settings, how one lays
//! over another, and how the defaults fill the rest ([`Config::from_layer`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::overlay::{overlay_section, Overlay};
use super::*;

overlay_section! {
    /// One source of settings; `None` means "not set here". Also the TOML file's schema.
    #[derive(Debug)]
    pub struct Layer {
        pub postgres: PostgresLayer,
        pub kafka: KafkaLayer,
        pub mapping: MappingLayer,
        pub relay: RelayLayer,
        pub log: LogLayer,
    }
}

overlay_section! {
    pub struct PostgresLayer {
        pub url: Option<String>,
        /// Never read from the file: `OUTBOX_RELAY_POSTGRES_PASSWORD` only.
        #[serde(skip)]
        pub password: Option<String>,
        /// A file holding the password (a trailing newline is dropped).
        pub password_file: Option<PathBuf>,
        pub slot: Option<String>,
        pub publication: Option<String>,
        pub table: Option<TableName>,
        pub create_slot: Option<bool>,
        pub create_publication: Option<bool>,
        /// PostgreSQL 17+: create the slot with `FAILOVER` (synchronised to standbys).
        pub failover_slot: Option<bool>,
        pub application_name: Option<String>,
        #[serde(deserialize_with = "units::de_opt_duration")]
        pub status_interval: Option<Duration>,
        #[serde(deserialize_with = "units::de_opt_duration")]
        pub connect_timeout: Option<Duration>,
        #[serde(deserialize_with = "units::de_opt_byte_size")]
        pub max_frame_bytes: Option<usize>,
    }
}

impl fmt::Debug for PostgresLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresLayer")
            .field("url", &self.url.as_deref().map(conninfo::redact))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("table", &self.table)
            .field("create_slot", &self.create_slot)
            .field("create_publication", &self.create_publication)
            .field("failover_slot", &self.failover_slot)
            .field("application_name", &self.application_name)
            .field("status_interval", &self.status_interval)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .finish()
    }
}

overlay_section! {
    pub struct KafkaLayer {
        pub brokers: Option<String>,
        /// Merged key by key with lower layers.
        #[serde(deserialize_with = "de_properties")]
        pub properties: BTreeMap<String, String>,
        pub create_topics: Option<bool>,
        pub topic_partitions: Option<i32>,
        pub topic_replication_factor: Option<i32>,
        /// TLS and SASL, typed (see `kafka_security`); rendered into `properties`.
        pub security_protocol: Option<KafkaSecurityProtocol>,
        pub ssl_ca: Option<PathBuf>,
        pub ssl_cert: Option<PathBuf>,
        pub ssl_key: Option<PathBuf>,
        pub sasl_mechanism: Option<KafkaSaslMechanism>,
        pub sasl_username: Option<String>,
        /// Never read from the file: `OUTBOX_RELAY_KAFKA_SASL_PASSWORD` only.
        #[serde(skip)]
        pub sasl_password: Option<String>,
        /// A file holding the SASL password (a trailing newline is dropped).
        pub sasl_password_file: Option<PathBuf>,
    }
}

impl fmt::Debug for KafkaLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaLayer")
            .field("brokers", &self.brokers)
            .field("properties", &redacted_map(&self.properties))
            .field("create_topics", &self.create_topics)
            .field("topic_partitions", &self.topic_partitions)
            .field("topic_replication_factor", &self.topic_replication_factor)
            .field("security_protocol", &self.security_protocol)
            .field("ssl_ca", &self.ssl_ca)
            .field("ssl_cert", &self.ssl_cert)
            .field("ssl_key", &self.ssl_key)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field(
                "sasl_password",
                &self.sasl_password.as_ref().map(|_| "<redacted>"),
            )
            .field("sasl_password_file", &self.sasl_password_file)
            .finish()
    }
}

overlay_section! {
    #[derive(Debug)]
    pub struct MappingLayer {
        pub id_column: Option<String>,
        pub key_column: Option<String>,
        pub route_column: Option<String>,
        pub payload_column: Option<String>,
        /// `""` means "no type column".
        pub type_column: Option<String>,
        pub topic_template: Option<String>,
        /// `""` means "no fixed topic".
        pub topic: Option<String>,
        /// Replaces the lower layers' list as a whole.
        pub header_columns: Option<Vec<String>>,
        pub provenance_headers: Option<bool>,
        /// `"raw"` or `"json"`.
        pub payload_format: Option<PayloadFormat>,
        /// `false`: logical decoding messages carry no events.
        pub messages: Option<bool>,
        pub message_prefix: Option<String>,
        /// `"none"`, `"cloudevents-binary"` or `"cloudevents-structured"`.
        pub envelope: Option<crate::envelope::EnvelopeMode>,
        pub ce_source: Option<String>,
        /// `""` means "off".
        pub trace_column: Option<String>,
        /// `""` means "off".
        pub tracestate_column: Option<String>,
    }
}

overlay_section! {
    #[derive(Debug)]
    pub struct RelayLayer {
        pub max_in_flight_records: Option<usize>,
        #[serde(deserialize_with = "units::de_opt_byte_size")]
        pub max_in_flight_bytes: Option<usize>,
        #[serde(deserialize_with = "units::de_opt_duration")]
        pub shutdown_timeout: Option<Duration>,
        #[serde(deserialize_with = "units::de_opt_duration")]
        pub reconnect_backoff_min: Option<Duration>,
        #[serde(deserialize_with = "units::de_opt_duration")]
        pub reconnect_backoff_max: Option<Duration>,
        pub http_listen: Option<String>,
        #[serde(deserialize_with = "units::de_opt_duration")]
        pub ready_stall_timeout: Option<Duration>,
        /// `""` means "off".
        pub otlp_endpoint: Option<String>,
        pub dead_letter_topic: Option<String>,
        /// `class = "stop" | "dead-letter"`, `"*"` for the default.
        pub poison_policy: Option<BTreeMap<String, String>>,
        #[serde(deserialize_with = "units::de_opt_duration")]
        pub slot_busy_retry: Option<Duration>,
        pub terminate_stale_holder: Option<bool>,
        #[serde(deserialize_with = "units::de_opt_duration")]
        pub stale_holder_timeout: Option<Duration>,
        pub delete_delivered: Option<bool>,
    }
}

overlay_section! {
    #[derive(Debug)]
    pub struct LogLayer {
        pub format: Option<LogFormat>,
        pub filter: Option<String>,
    }
}

/// librdkafka takes strings; TOML numbers and booleans are accepted and written out.
fn de_properties<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    use serde::de::Error as _;
    let raw = BTreeMap::<String, toml::Value>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            let v = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(x) => x.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(D::Error::custom(format!(
                        "kafka property {k:?} must be a string, number or boolean, not a {}",
                        other.type_str()
                    )))
                }
            };
            Ok((k, v))
        })
        .collect()
}

impl Layer {
    /// Reads and parses a TOML configuration file.
    pub fn from_toml_file(path: &Path) -> Result<Layer, Problem> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Problem::new(
                format!("cannot read config file {}: {e}", path.display()),
                "check the --config path (or OUTBOX_RELAY_CONFIG) and its permissions",
            )
        })?;
        Layer::from_toml_str(&text, &path.display().to_string())
    }

    /// Parses TOML text; `origin` names it in the message. The message gives the line
    /// and toml's reason (which names an unknown key and lists the valid ones) but not
    /// toml's source excerpt, which could show a password.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Layer, Problem> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let at = line.map(|l| format!(", line {l}")).unwrap_or_default();
            Problem::new(
                format!("config file {origin}{at}: {}", e.message().trim_end()),
                "correct or remove that key (keys are listed in the README)",
            )
        })
    }

    /// This layer with `top` laid over it: every value `top` sets wins; Kafka
    /// properties and poison policies merge key by key (see [`overlay`](super::overlay)).
    pub fn overlay(self, top: Layer) -> Layer {
        Overlay::overlay(self, top)
    }
}

impl Config {
    /// Fills what `layer` leaves unset with the defaults, reads the password file,
    /// and validates. Every problem is reported in one error.
    pub fn from_layer(layer: Layer) -> Result<Config, ConfigError> {
        let raw_poison_policy = layer.relay.poison_policy.clone();
        let (config, mut problems) = Config::resolve(layer);
        problems.extend(validate::validate(&config));
        validate::poison(raw_poison_policy.as_ref(), &config, &mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// `layer` with the defaults filled in and the secret files read, and what
    /// went wrong on the way; not validated. This is the one place the
    /// `DEFAULT_*` constants are applied: `Config::default()` is this with
    /// nothing set.
    pub(super) fn resolve(layer: Layer) -> (Config, Vec<Problem>) {
        let mut problems = Vec::new();
        let Layer {
            postgres: p,
            kafka: k,
            mapping: m,
            relay: r,
            log: l,
        } = layer;

        let password = secret_from(
            p.password,
            p.password_file,
            ENV_POSTGRES_PASSWORD,
            "PostgreSQL",
            "postgres.password_file / --postgres-password-file",
            &mut problems,
        );
        let sasl_password = secret_from(
            k.sasl_password,
            k.sasl_password_file,
            ENV_KAFKA_SASL_PASSWORD,
            "Kafka SASL",
            "kafka.sasl_password_file / --kafka-sasl-password-file",
            &mut problems,
        );
        let security = KafkaSecurity {
            protocol: k.security_protocol,
            ssl_ca: k.ssl_ca,
            ssl_cert: k.ssl_cert,
            ssl_key: k.ssl_key,
            sasl_mechanism: k.sasl_mechanism,
            sasl_username: k.sasl_username,
            sasl_password,
        };
        let mut kafka_properties = k.properties;
        problems.extend(security.apply(&mut kafka_properties));

        // application_name and connect_timeout inside the URL sit just above the defaults.
        let url = p.url.unwrap_or_default();
        let from_url = conninfo::parse(&url, None).ok().map(|ci| ci.pg);
        let url_app = from_url
            .as_ref()
            .and_then(|c| c.get_application_name().map(str::to_string));
        let url_timeout = from_url
            .as_ref()
            .and_then(|c| c.get_connect_timeout().copied());

        let config = Config {
            postgres: PostgresConfig {
                url,
                password,
                slot: p.slot.unwrap_or_else(|| DEFAULT_SLOT.into()),
                publication: p.publication.unwrap_or_else(|| DEFAULT_PUBLICATION.into()),
                table: p.table.unwrap_or_default(),
                create_slot: p.create_slot.unwrap_or(DEFAULT_CREATE_SLOT),
                create_publication: p.create_publication.unwrap_or(DEFAULT_CREATE_PUBLICATION),
                failover_slot: p.failover_slot.unwrap_or(DEFAULT_FAILOVER_SLOT),
                pinned_host: None,
                application_name: p
                    .application_name
                    .or(url_app)
                    .unwrap_or_else(|| DEFAULT_APPLICATION_NAME.into()),
                status_interval: p.status_interval.unwrap_or(DEFAULT_STATUS_INTERVAL),
                connect_timeout: p
                    .connect_timeout
                    .or(url_timeout)
                    .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
                max_frame_bytes: p.max_frame_bytes.unwrap_or(DEFAULT_MAX_FRAME_BYTES),
            },
            kafka: KafkaConfig {
                brokers: k.brokers.unwrap_or_default(),
                properties: kafka_properties,
                create_topics: k.create_topics.unwrap_or(DEFAULT_CREATE_TOPICS),
                topic_partitions: k.topic_partitions.unwrap_or(DEFAULT_TOPIC_PARTITIONS),
                topic_replication_factor: k
                    .topic_replication_factor
                    .unwrap_or(DEFAULT_TOPIC_REPLICATION_FACTOR),
            },
            mapping: MappingConfig {
                id_column: m.id_column.unwrap_or_else(|| DEFAULT_ID_COLUMN.into()),
                key_column: m.key_column.unwrap_or_else(|| DEFAULT_KEY_COLUMN.into()),
                route_column: m
                    .route_column
                    .unwrap_or_else(|| DEFAULT_ROUTE_COLUMN.into()),
                payload_column: m
                    .payload_column
                    .unwrap_or_else(|| DEFAULT_PAYLOAD_COLUMN.into()),
                type_column: match m.type_column {
                    None => Some(DEFAULT_TYPE_COLUMN.into()),
                    Some(c) if c.is_empty() => None,
                    Some(c) => Some(c),
                },
                topic_template: m
                    .topic_template
                    .unwrap_or_else(|| DEFAULT_TOPIC_TEMPLATE.into()),
                topic: m.topic.filter(|t| !t.is_empty()),
                header_columns: m.header_columns.unwrap_or_default(),
                provenance_headers: m.provenance_headers.unwrap_or(DEFAULT_PROVENANCE_HEADERS),
                payload_format: m.payload_format.unwrap_or(DEFAULT_PAYLOAD_FORMAT),
                message_prefix: match m.messages {
                    Some(false) => None,
                    _ => Some(
                        m.message_prefix
                            .unwrap_or_else(|| super::DEFAULT_MESSAGE_PREFIX.into()),
                    ),
                },
                envelope: m.envelope.unwrap_or(super::DEFAULT_ENVELOPE),
                ce_source: m.ce_source.filter(|s| !s.is_empty()),
                trace_column: match m.trace_column {
                    None => Some(super::DEFAULT_TRACE_COLUMN.into()),
                    Some(c) => Some(c).filter(|c| !c.is_empty()),
                },
                tracestate_column: match m.tracestate_column {
                    None => Some(super::DEFAULT_TRACESTATE_COLUMN.into()),
                    Some(c) => Some(c).filter(|c| !c.is_empty()),
                },
            },
            relay: RelayConfig {
                max_in_flight_records: r
                    .max_in_flight_records
                    .unwrap_or(DEFAULT_MAX_IN_FLIGHT_RECORDS),
                max_in_flight_bytes: r.max_in_flight_bytes.unwrap_or(DEFAULT_MAX_IN_FLIGHT_BYTES),
                shutdown_timeout: r.shutdown_timeout.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT),
                reconnect_backoff_min: r
                    .reconnect_backoff_min
                    .unwrap_or(DEFAULT_RECONNECT_BACKOFF_MIN),
                reconnect_backoff_max: r
                    .reconnect_backoff_max
                    .unwrap_or(DEFAULT_RECONNECT_BACKOFF_MAX),
                http_listen: r
                    .http_listen
                    .unwrap_or_else(|| super::DEFAULT_HTTP_LISTEN.to_string()),
                ready_stall_timeout: r
                    .ready_stall_timeout
                    .unwrap_or(super::DEFAULT_READY_STALL_TIMEOUT),
                otlp_endpoint: r.otlp_endpoint.filter(|e| !e.is_empty()),
                dead_letter_topic: r.dead_letter_topic.filter(|t| !t.is_empty()),
                poison_policies: r
                    .poison_policy
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
                    .collect(),
                slot_busy_retry: r.slot_busy_retry.unwrap_or(super::DEFAULT_SLOT_BUSY_RETRY),
                terminate_stale_holder: r.terminate_stale_holder.unwrap_or(false),
                stale_holder_timeout: r
                    .stale_holder_timeout
                    .unwrap_or(super::DEFAULT_STALE_HOLDER_TIMEOUT),
                delete_delivered: r.delete_delivered.unwrap_or(false),
            },
            log: LogConfig {
                format: l.format.unwrap_or(DEFAULT_LOG_FORMAT),
                filter: l.filter.unwrap_or_else(|| DEFAULT_LOG_FILTER.into()),
            },
        };
        (config, problems)
    }
}

/// A secret given in the environment or in a file (`*_FILE`), never both.
fn secret_from(
    env_value: Option<String>,
    file: Option<PathBuf>,
    env_name: &str,
    what: &str,
    file_setting: &str,
    problems: &mut Vec<Problem>,
) -> Option<String> {
    match (env_value, file) {
        (Some(_), Some(file)) => {
            problems.push(Problem::new(
                format!(
                    "both {env_name} and a password file ({}) are set",
                    file.display()
                ),
                "keep one of them",
            ));
            None
        }
        (Some(pw), None) => Some(pw),
        (None, Some(file)) => match std::fs::read_to_string(&file) {
            Ok(text) => Some(strip_one_newline(text)),
            Err(e) => {
                problems.push(Problem::new(
                    format!(
                        "cannot read the {what} password file {}: {e}",
                        file.display()
                    ),
                    format!("fix {file_setting}, or the file's permissions"),
                ));
                None
            }
        },
        (None, None) => None,
    }
}

fn strip_one_newline(mut s: String) -> String {
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    s
}
