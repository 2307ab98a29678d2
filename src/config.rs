//! Configuration: what the relay connects to, how rows become records, and its limits.
//!
//! Four layers, lowest to highest: the documented defaults below (`DEFAULT_*`), the
//! TOML file (`--config FILE`), `OUTBOX_RELAY_*` environment variables, and flags.
//! clap resolves environment and flags into one [`Layer`] (a flag beats its
//! variable); [`crate::cli::load`] lays that over the file's [`Layer`] and
//! [`Config::from_layer`] fills the gaps with defaults and validates the result.
//!
//! Rules that hold across layers:
//! - Unknown TOML keys and unknown `OUTBOX_RELAY_*` variables are errors, never ignored.
//! - Validation reports every problem at once, each with its fix.
//! - A higher layer replaces a whole value; `kafka.properties` merge key by key.
//! - An empty `type_column` or `topic` means "none".
//! - `application_name` and `connect_timeout` given inside `postgres.url` count as set
//!   just above the defaults: any layer that sets them wins over the URL.
//! - Passwords are never printed: `Debug` redacts the URL, the password and secret
//!   Kafka properties.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

mod conninfo;
mod ident;
mod kafka_security;
mod layer;
mod overlay;
mod units;
mod validate;

pub use layer::{KafkaLayer, Layer, LogLayer, MappingLayer, PostgresLayer, RelayLayer};

pub use conninfo::redact as redact_connection_string;
pub use conninfo::SessionAttrs;
pub use ident::{quote_ident, quote_literal, ParseTableNameError, TableName, MAX_IDENTIFIER_BYTES};
use kafka_security::KafkaSecurity;
pub use kafka_security::{KafkaSaslMechanism, KafkaSecurityProtocol};
pub use units::{format_byte_size, format_duration, parse_byte_size, parse_duration};

// ---------------------------------------------------------------------------
// Defaults
// ---------------------------------------------------------------------------

/// Prefix of every environment variable the relay reads.
pub const ENV_PREFIX: &str = "OUTBOX_RELAY_";
/// The PostgreSQL password, kept out of the URL and of `ps` (environment only; no flag).
pub const ENV_POSTGRES_PASSWORD: &str = "OUTBOX_RELAY_POSTGRES_PASSWORD";
/// The Kafka SASL password (environment only; or `--kafka-sasl-password-file`).
pub const ENV_KAFKA_SASL_PASSWORD: &str = "OUTBOX_RELAY_KAFKA_SASL_PASSWORD";

pub const DEFAULT_SLOT: &str = "outbox_relay";
pub const DEFAULT_PUBLICATION: &str = "outbox_relay";
pub const DEFAULT_TABLE_SCHEMA: &str = "public";
pub const DEFAULT_TABLE_NAME: &str = "outbox_events";
/// Create the replication slot when it is missing.
pub const DEFAULT_CREATE_SLOT: bool = true;
/// Create the publication (`FOR TABLE <table> WITH (publish = 'insert')`) when missing.
pub const DEFAULT_CREATE_PUBLICATION: bool = true;
/// PostgreSQL 17+: a new slot is a failover slot unless turned off.
pub const DEFAULT_FAILOVER_SLOT: bool = true;
/// Shown in `pg_stat_activity` / `pg_stat_replication`; tells our walsender apart.
pub const DEFAULT_APPLICATION_NAME: &str = "outbox-relay";
/// Standby status update period; well under the server's `wal_sender_timeout` (60 s).
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest replication message accepted (one row must fit).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 << 20;

/// Create a missing topic through the admin API before its first record.
pub const DEFAULT_CREATE_TOPICS: bool = true;
pub const DEFAULT_TOPIC_PARTITIONS: i32 = 1;
/// `-1`: the broker's `default.replication.factor`.
pub const DEFAULT_TOPIC_REPLICATION_FACTOR: i32 = -1;

/// Debezium EventRouter column names.
pub const DEFAULT_ID_COLUMN: &str = "id";
pub const DEFAULT_KEY_COLUMN: &str = "aggregateid";
pub const DEFAULT_ROUTE_COLUMN: &str = "aggregatetype";
pub const DEFAULT_PAYLOAD_COLUMN: &str = "payload";
pub const DEFAULT_TYPE_COLUMN: &str = "type";
/// The one placeholder of a topic template: the route column's value.
pub const TOPIC_TEMPLATE_PLACEHOLDER: &str = "${routedByValue}";
pub const DEFAULT_TOPIC_TEMPLATE: &str = "outbox.event.${routedByValue}";
/// Add commit LSN, transaction id and commit time headers.
pub const DEFAULT_PROVENANCE_HEADERS: bool = true;
/// Payloads pass byte for byte, unchecked (see [`PayloadFormat`]).
pub const DEFAULT_PAYLOAD_FORMAT: PayloadFormat = PayloadFormat::Raw;
/// Records as they always were (see [`crate::envelope`]).
pub const DEFAULT_ENVELOPE: crate::envelope::EnvelopeMode = crate::envelope::EnvelopeMode::None;
/// W3C trace context columns, used when the table has them (see [`crate::trace`]).
pub const DEFAULT_TRACE_COLUMN: &str = "traceparent";
pub const DEFAULT_TRACESTATE_COLUMN: &str = "tracestate";

pub const DEFAULT_MAX_IN_FLIGHT_RECORDS: usize = 20_000;
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: usize = 16 << 20;
/// How long SIGTERM waits for in-flight records before giving up (they replay).
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const DEFAULT_RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Address of the /metrics, /healthz and /readyz listener; `off` disables it.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9187";
/// `/readyz` fails when records are in flight and no acknowledgement came for this long.
pub const DEFAULT_READY_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between attempts while another process holds the slot (standby).
pub const DEFAULT_SLOT_BUSY_RETRY: Duration = Duration::from_secs(2);
/// A walsender on our slot with our application_name that sent no status
/// reply for this long is stale (a half-open connection of a dead relay).
pub const DEFAULT_STALE_HOLDER_TIMEOUT: Duration = Duration::from_secs(30);

/// What happens to a row that can never become a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonPolicy {
    /// Stop the relay with an error naming the row and the fix.
    Stop,
    /// Send the row to the dead-letter topic with the reason, and go on.
    DeadLetter,
}

impl std::str::FromStr for PoisonPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "stop" => Ok(PoisonPolicy::Stop),
            "dead-letter" => Ok(PoisonPolicy::DeadLetter),
            other => Err(format!(
                "unknown poison policy {other:?}: use stop or dead-letter"
            )),
        }
    }
}

/// Classes of poison rows, each with its own policy.
pub const POISON_CLASSES: &[&str] = &[
    "null_column",
    "invalid_payload",
    "invalid_topic",
    "too_large",
    "missing_column",
    "bad_value",
    "rejected_by_broker",
    "invalid_message",
];

/// Prefix of the logical decoding messages that carry events.
pub const DEFAULT_MESSAGE_PREFIX: &str = "outbox";

/// What the payload column must hold.
///
/// `json` and `jsonb` columns hold valid JSON by construction (PostgreSQL checks
/// their text on input), so the format only matters for other column types (text,
/// varchar, bytea, domains): under `json` each of their payloads is checked, and one
/// that is not JSON is a poison row of class `invalid_payload`. Under `raw` nothing
/// is checked, as with Debezium's EventRouter. A NULL payload is no payload (a
/// record without a value) under both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// Send the payload as it is, unchecked.
    Raw,
    /// The payload must be one JSON value (UTF-8, RFC 8259).
    Json,
}

pub const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Text;
/// A `tracing_subscriber::EnvFilter` directive.
pub const DEFAULT_LOG_FILTER: &str = "info";

// ---------------------------------------------------------------------------
// The resolved configuration
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub postgres: PostgresConfig,
    pub kafka: KafkaConfig,
    pub mapping: MappingConfig,
    pub relay: RelayConfig,
    pub log: LogConfig,
}

#[derive(Clone, PartialEq)]
pub struct PostgresConfig {
    /// libpq URL (`postgres://...`) or `key=value` conninfo; may hold a password.
    pub url: String,
    /// Given apart from the URL (environment or file); overrides the URL's password.
    pub password: Option<String>,
    pub slot: String,
    pub publication: String,
    pub table: TableName,
    pub create_slot: bool,
    pub create_publication: bool,
    /// PostgreSQL 17+: create the slot with `FAILOVER` (`--no-failover-slot`).
    pub failover_slot: bool,
    /// Which host of a multi-host URL every connection goes to; set by the relay
    /// once it chose a server ([`PostgresConfig::pinned_to`]), never by the user.
    pub pinned_host: Option<usize>,
    pub application_name: String,
    pub status_interval: Duration,
    pub connect_timeout: Duration,
    pub max_frame_bytes: usize,
}

#[derive(Clone, PartialEq)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: `host:port[,host:port...]`.
    pub brokers: String,
    /// librdkafka properties passed through as they are.
    pub properties: BTreeMap<String, String>,
    pub create_topics: bool,
    pub topic_partitions: i32,
    pub topic_replication_factor: i32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MappingConfig {
    /// Header `id`: consumers deduplicate by it.
    pub id_column: String,
    /// The record key.
    pub key_column: String,
    /// Its value replaces `${routedByValue}` in the topic template.
    pub route_column: String,
    /// The record value, as PostgreSQL renders it.
    pub payload_column: String,
    /// Header `type`; `None` for tables without one.
    pub type_column: Option<String>,
    pub topic_template: String,
    /// One fixed topic for every record; overrides the template.
    pub topic: Option<String>,
    /// More columns sent as headers named like the column.
    pub header_columns: Vec<String>,
    pub provenance_headers: bool,
    /// See [`PayloadFormat`].
    pub payload_format: PayloadFormat,
    /// Prefix of the logical decoding messages that carry events
    /// (`pg_logical_emit_message`); `None`: messages are off (`--no-messages`).
    pub message_prefix: Option<String>,
    /// CloudEvents envelope (see [`crate::envelope`]).
    pub envelope: crate::envelope::EnvelopeMode,
    /// CloudEvents `source`; `None`: `/outbox-relay/<database>/<table>`.
    pub ce_source: Option<String>,
    /// Column carried as header `traceparent`; `None`: off. The default name
    /// is optional (used when the table has it), any other name required.
    pub trace_column: Option<String>,
    /// Column carried as header `tracestate`, likewise.
    pub tracestate_column: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RelayConfig {
    pub max_in_flight_records: usize,
    pub max_in_flight_bytes: usize,
    pub shutdown_timeout: Duration,
    pub reconnect_backoff_min: Duration,
    pub reconnect_backoff_max: Duration,
    /// `host:port` of the HTTP listener, or `off`.
    pub http_listen: String,
    /// See [`DEFAULT_READY_STALL_TIMEOUT`].
    pub ready_stall_timeout: Duration,
    /// OTLP/HTTP collector for the relay's spans; `None`: no spans (see [`crate::trace`]).
    pub otlp_endpoint: Option<String>,
    /// Topic for poison rows under the `dead-letter` policy.
    pub dead_letter_topic: Option<String>,
    /// Policy by poison class (see [`POISON_CLASSES`]); `"*"` is the default.
    pub poison_policies: std::collections::BTreeMap<String, PoisonPolicy>,
    /// See [`DEFAULT_SLOT_BUSY_RETRY`].
    pub slot_busy_retry: Duration,
    /// Terminate a stale walsender holding our slot (see [`DEFAULT_STALE_HOLDER_TIMEOUT`]).
    pub terminate_stale_holder: bool,
    pub stale_holder_timeout: Duration,
    /// Delete outbox rows once the slot's confirmed position passed their
    /// transaction (`--delete-delivered`, see `relay::cleanup`).
    pub delete_delivered: bool,
}

impl RelayConfig {
    /// The policy for a poison class: its own, else `*`, else dead-letter when a
    /// dead-letter topic is set and stop otherwise.
    pub fn poison_policy(&self, class: &str) -> PoisonPolicy {
        self.poison_policies
            .get(class)
            .or_else(|| self.poison_policies.get("*"))
            .copied()
            .unwrap_or(if self.dead_letter_topic.is_some() {
                PoisonPolicy::DeadLetter
            } else {
                PoisonPolicy::Stop
            })
    }

    /// The HTTP listener's address; `None` when switched off.
    pub fn http_listen_addr(&self) -> Option<std::net::SocketAddr> {
        if self.http_listen.eq_ignore_ascii_case("off") {
            return None;
        }
        self.http_listen.parse().ok()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `tracing_subscriber::EnvFilter` directives, e.g. `info,outbox_relay=debug`.
    pub filter: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    // Human-readable lines.
    Text,
    // One JSON object per line.
    Json,
}

/// The defaults are the `DEFAULT_*` constants, applied in one place: the
/// resolution of a layer that sets nothing ([`Config::from_layer`]'s first step).
impl Default for Config {
    fn default() -> Self {
        Config::resolve(Layer::default()).0
    }
}

/// Each section's default is its part of [`Config::default`].
macro_rules! section_default {
    ($($section:ident: $ty:ty),* $(,)?) => {
        $(impl Default for $ty {
            fn default() -> Self {
                Config::default().$section
            }
        })*
    };
}

section_default!(
    postgres: PostgresConfig,
    kafka: KafkaConfig,
    mapping: MappingConfig,
    relay: RelayConfig,
    log: LogConfig,
);

impl MappingConfig {
    /// The columns a row must have, in the order they are checked: id, key, route
    /// (unless a fixed topic is set), payload, type (if any), header columns,
    /// trace columns named otherwise than the default.
    pub fn required_columns(&self) -> Vec<&str> {
        let mut cols = vec![self.id_column.as_str(), self.key_column.as_str()];
        if self.topic.is_none() {
            cols.push(&self.route_column);
        }
        cols.push(&self.payload_column);
        cols.extend(self.type_column.as_deref());
        cols.extend(self.header_columns.iter().map(String::as_str));
        // Trace columns under another name than the default are required.
        for (c, default) in [
            (&self.trace_column, DEFAULT_TRACE_COLUMN),
            (&self.tracestate_column, DEFAULT_TRACESTATE_COLUMN),
        ] {
            cols.extend(c.as_deref().filter(|c| *c != default));
        }
        let mut seen = std::collections::HashSet::new();
        cols.retain(|c| seen.insert(*c));
        cols
    }
}

impl PostgresConfig {
    /// Where and how the replication connection goes: the URL's first TCP host
    /// (or the one [`pinned`](PostgresConfig::pinned_to)), its user and database,
    /// the password override, and our settings.
    pub fn replication_connect_config(
        &self,
    ) -> Result<crate::replication::ConnectConfig, ConfigError> {
        let (mut all, _) = self.replication_targets()?;
        Ok(all.swap_remove(0))
    }

    /// One replication connection per host the URL lists (in libpq's order; only
    /// the pinned one once pinned), and the URL's `target_session_attrs`.
    pub fn replication_targets(
        &self,
    ) -> Result<
        (
            Vec<crate::replication::ConnectConfig>,
            conninfo::SessionAttrs,
        ),
        ConfigError,
    > {
        let ci = conninfo::parse(&self.url, self.password.as_deref())
            .map_err(|p| ConfigError::Invalid(vec![p]))?;
        let ep = conninfo::endpoint(&ci).map_err(ConfigError::Invalid)?;
        let targets = self.chosen(&ep.targets)?;
        let all = targets
            .into_iter()
            .map(|t| crate::replication::ConnectConfig {
                host: t.host.clone(),
                port: t.port,
                user: ep.user.clone(),
                password: ep.password.clone(),
                dbname: ep.dbname.clone(),
                application_name: self.application_name.clone(),
                connect_timeout: self.connect_timeout,
                max_frame_bytes: self.max_frame_bytes,
                tls: crate::replication::TlsOptions {
                    server_name: t.server_name.clone(),
                    ..ep.tls.clone()
                },
            })
            .collect();
        Ok((all, ep.session_attrs))
    }

    /// The URL's hosts, or only the pinned one.
    fn chosen<'a>(
        &self,
        targets: &'a [conninfo::Target],
    ) -> Result<Vec<&'a conninfo::Target>, ConfigError> {
        match self.pinned_host {
            None => Ok(targets.iter().collect()),
            Some(i) => targets.get(i).map(|t| vec![t]).ok_or_else(|| {
                ConfigError::Invalid(vec![Problem::new(
                    format!("postgres.url has no host number {}", i + 1),
                    "this is a bug: the relay pinned a host the URL does not list",
                )])
            }),
        }
    }

    /// How many hosts the URL lists.
    pub fn host_count(&self) -> usize {
        conninfo::parse(&self.url, self.password.as_deref())
            .ok()
            .and_then(|ci| conninfo::endpoint(&ci).ok())
            .map_or(1, |ep| ep.targets.len())
    }

    /// This configuration with every connection going to host number `index`
    /// (0-based) of the URL: how the relay keeps its SQL and replication
    /// connections on the one server it chose.
    pub fn pinned_to(&self, index: usize) -> PostgresConfig {
        PostgresConfig {
            pinned_host: Some(index),
            ..self.clone()
        }
    }

    /// How both connections use TLS: the URL's `sslmode`, `sslrootcert`,
    /// `sslcert`, `sslkey`, `sslnegotiation` and `channel_binding` (libpq meanings),
    /// checked against the first (or pinned) host's name.
    pub fn tls_options(&self) -> Result<crate::replication::TlsOptions, ConfigError> {
        Ok(self.replication_connect_config()?.tls)
    }

    /// A `tokio_postgres` configuration for ordinary SQL (checks, status) against the
    /// same server, with the password override, `application_name` and timeout.
    /// With several hosts, the first (or pinned) one: [`crate::sql::connect`] goes
    /// through [`sql_targets`](Self::sql_targets) to choose.
    pub fn sql_config(&self) -> Result<tokio_postgres::Config, ConfigError> {
        Ok(self.sql_targets()?.0.swap_remove(0).0)
    }

    /// One SQL configuration (and its TLS options) per host the URL lists, in
    /// order (only the pinned one once pinned), and `target_session_attrs`.
    #[allow(clippy::type_complexity)]
    pub fn sql_targets(
        &self,
    ) -> Result<
        (
            Vec<(tokio_postgres::Config, crate::replication::TlsOptions)>,
            conninfo::SessionAttrs,
        ),
        ConfigError,
    > {
        let ci = conninfo::parse(&self.url, self.password.as_deref())
            .map_err(|p| ConfigError::Invalid(vec![p]))?;
        let ep = conninfo::endpoint(&ci).map_err(ConfigError::Invalid)?;
        let all = self
            .chosen(&ep.targets)?
            .into_iter()
            .map(|t| {
                let mut pg = conninfo::single_host(&ci.pg, t);
                pg.application_name(&self.application_name);
                pg.connect_timeout(self.connect_timeout);
                let tls = crate::replication::TlsOptions {
                    server_name: t.server_name.clone(),
                    ..ep.tls.clone()
                };
                (pg, tls)
            })
            .collect();
        Ok((all, ep.session_attrs))
    }

    /// The URL with passwords replaced by `<redacted>`, for logs and messages.
    pub fn redacted_url(&self) -> String {
        conninfo::redact(&self.url)
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &self.redacted_url())
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("table", &self.table)
            .field("create_slot", &self.create_slot)
            .field("create_publication", &self.create_publication)
            .field("failover_slot", &self.failover_slot)
            .field("pinned_host", &self.pinned_host)
            .field("application_name", &self.application_name)
            .field("status_interval", &self.status_interval)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .finish()
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("properties", &redacted_map(&self.properties))
            .field("create_topics", &self.create_topics)
            .field("topic_partitions", &self.topic_partitions)
            .field("topic_replication_factor", &self.topic_replication_factor)
            .finish()
    }
}

/// Parts of librdkafka property names whose values are secrets (`sasl.password`,
/// `ssl.key.pem`, `sasl.jaas.config`, `sasl.oauthbearer.client.secret`, ...).
const SECRET_PROPERTY_MARKERS: &[&str] = &[
    "password",
    "secret",
    "jaas",
    ".pem",
    "oauthbearer.config",
    "token",
];

/// Whether a librdkafka property holds a secret.
pub fn is_secret_kafka_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_PROPERTY_MARKERS.iter().any(|m| key.contains(m))
}

/// Kafka properties with secret values replaced by `<redacted>`, for `Debug` and logs.
pub fn redacted_properties<'a>(
    props: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> BTreeMap<&'a str, &'a str> {
    props
        .into_iter()
        .map(|(k, v)| {
            let shown = if is_secret_kafka_property(k) {
                "<redacted>"
            } else {
                v
            };
            (k, shown)
        })
        .collect()
}

fn redacted_map(props: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    redacted_properties(props.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

// ---------------------------------------------------------------------------
// Problems and errors
// ---------------------------------------------------------------------------

/// How much a [`Problem`] matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// The relay cannot run (or would break its guarantees) until it is fixed.
    Error,
    /// Worth knowing; `run` proceeds (e.g. the slot is held by another process right
    /// now, or the publication will be created).
    Info,
}

/// One thing wrong, and how to fix it. Shared by config validation and preflight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub what: String,
    pub fix: String,
    pub severity: Severity,
}

impl Problem {
    pub fn new(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Problem {
            what: what.into(),
            fix: fix.into(),
            severity: Severity::Error,
        }
    }

    pub fn info(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Problem {
            what: what.into(),
            fix: fix.into(),
            severity: Severity::Info,
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} — fix: {}", self.what, self.fix)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Every problem found (file, environment, values), each with its fix.
    #[error("{}", render_invalid(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(p) => p,
        }
    }
}

fn render_invalid(problems: &[Problem]) -> String {
    match problems {
        [one] => format!("invalid configuration: {one}"),
        many => {
            let mut s = format!("invalid configuration ({} problems):", many.len());
            for p in many {
                s.push_str(&format!("\n  - {p}"));
            }
            s
        }
    }
}

#[cfg(test)]
mod tests;
