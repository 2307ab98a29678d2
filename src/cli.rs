//! The command line: `outbox-relay [--config FILE] <COMMAND> [FLAGS]`.
//!
//! Every setting flag has an environment variable named after it,
//! `OUTBOX_RELAY_<FLAG_IN_UPPER_SNAKE>` (`--slot` → `OUTBOX_RELAY_SLOT`); clap reads
//! both, a flag beating its variable. Flags carry no clap defaults (`None` = not
//! given) so the TOML file can fill what they leave open; the defaults shown in
//! `--help` are the `config::DEFAULT_*` constants. [`load`] merges everything.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::{
    self, parse_byte_size, parse_duration, Config, ConfigError, KafkaLayer, Layer, LogFormat,
    LogLayer, MappingLayer, PostgresLayer, Problem, RelayLayer, TableName, ENV_POSTGRES_PASSWORD,
    ENV_PREFIX,
};

/// Transactional outbox relay: PostgreSQL logical replication (pgoutput) to Kafka,
/// confirming the slot only after the broker acknowledges.
#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version, propagate_version = true)]
pub struct Cli {
    /// TOML configuration file; environment variables and flags override it
    #[arg(
        long = "config",
        value_name = "FILE",
        global = true,
        env = "OUTBOX_RELAY_CONFIG"
    )]
    pub config_file: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// Exit code of every command for an invalid command line or configuration
/// (unknown flag or variable, bad value, unreadable `--config` file): 64, BSD's
/// `EX_USAGE`. No `status` result uses it (those are 0 to 5), so a script acting
/// on "slot invalidated" (2) never acts on a typo.
pub const EXIT_USAGE: u8 = 64;

/// Prints a clap error (or the help / version it stands for) and picks the exit
/// code: 0 for `--help` and `--version`, [`EXIT_USAGE`] for real errors (clap's
/// own `exit()` would use 2, which `status` defines as "slot invalidated").
pub fn exit_for_parse_error(e: &clap::Error) -> std::process::ExitCode {
    // Printing can only fail when stdout/stderr is closed; nothing to tell then.
    let _ = e.print();
    if e.use_stderr() {
        std::process::ExitCode::from(EXIT_USAGE)
    } else {
        std::process::ExitCode::SUCCESS
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream inserted outbox rows to Kafka until stopped (SIGTERM drains, then exits 0)
    Run(RunArgs),
    /// Check the configuration, PostgreSQL and the outbox table; print each problem
    /// with its fix and exit non-zero if any must be fixed
    Check(CheckArgs),
    /// Show the slot, its position, lag and retained WAL, bookmarks and the
    /// publication (no streaming); exit 1 slot missing, 2 invalidated,
    /// 3 retaining more than --max-retained-bytes, 4 server unreadable,
    /// 5 a bookmark retaining more than --max-bookmark-retained-bytes,
    /// 64 invalid command line or configuration
    Status(StatusArgs),
    /// Bookmarks: copies of the slot that retain WAL from a point, to replay from
    Bookmark(BookmarkArgs),
    /// Re-publish events: from a bookmark's retained WAL, or from rows still in
    /// the outbox table; every record carries a `replay` header
    Replay(ReplayArgs),
    /// Show events pending in the slot (or a bookmark) without consuming them
    Peek(PeekArgs),
    /// Demo: relay + sample writer + consumer, with librdkafka's in-process mock
    /// cluster as the broker (scripts/demo.sh starts PostgreSQL for you)
    Demo(DemoArgs),
}

impl Command {
    /// The setting flags of this command, for commands that take them.
    pub fn config_args(&self) -> Option<&ConfigArgs> {
        match self {
            Command::Run(a) => Some(&a.config),
            Command::Check(a) => Some(&a.config),
            Command::Demo(a) => Some(&a.config),
            Command::Status(a) => Some(&a.config),
            Command::Bookmark(a) => Some(a.config()),
            Command::Replay(a) => Some(&a.config),
            Command::Peek(a) => Some(&a.config),
        }
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Start at this LSN instead of the slot's confirmed position (one-shot: it
    /// must be at or above the confirmed position; every transaction committing
    /// in between is skipped for good, and the relay logs how many rows)
    #[arg(long, value_name = "LSN", env = "OUTBOX_RELAY_START_LSN")]
    pub start_lsn: Option<crate::lsn::Lsn>,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct BookmarkArgs {
    #[command(subcommand)]
    pub action: BookmarkAction,
}

impl BookmarkArgs {
    pub fn config(&self) -> &ConfigArgs {
        match &self.action {
            BookmarkAction::Create { config, .. }
            | BookmarkAction::List { config }
            | BookmarkAction::Drop { config, .. } => config,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum BookmarkAction {
    /// Copy the live slot into <slot>_bookmark_<NAME>; WAL from its position is
    /// retained until the bookmark is dropped (it shows in `status`)
    Create {
        name: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List bookmarks with their position and retained WAL
    List {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Drop a bookmark and release the WAL it retains
    Drop {
        name: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Stream the range retained by this bookmark again
    #[arg(long, value_name = "NAME", env = "OUTBOX_RELAY_FROM_BOOKMARK",
          conflicts_with_all = ["from_id", "from_time"])]
    pub from_bookmark: Option<String>,
    /// With --from-bookmark: end of the range, exclusive: transactions whose commit
    /// LSN is at or above the bookmark's position and below this are replayed (an
    /// `outbox-relay-commit-lsn` header value is the natural input; it must be above
    /// the bookmark's position) [default: the server's WAL position at start, logged]
    #[arg(
        long,
        value_name = "LSN",
        env = "OUTBOX_RELAY_TO_LSN",
        requires = "from_bookmark"
    )]
    pub to_lsn: Option<crate::lsn::Lsn>,
    /// With --from-bookmark: keep the bookmark where it is (nothing is confirmed
    /// on it, so it can be replayed again) instead of dropping it after success
    #[arg(long, env = "OUTBOX_RELAY_KEEP_BOOKMARK", requires = "from_bookmark")]
    pub keep_bookmark: bool,
    /// Re-publish table rows with id >= this, in id order (refused for a uuid id
    /// column without --force: random uuids are not in insertion order)
    #[arg(
        long,
        value_name = "ID",
        env = "OUTBOX_RELAY_FROM_ID",
        conflicts_with = "from_time"
    )]
    pub from_id: Option<String>,
    /// With --from-id: last id to include (inclusive)
    #[arg(
        long,
        value_name = "ID",
        env = "OUTBOX_RELAY_TO_ID",
        requires = "from_id"
    )]
    pub to_id: Option<String>,
    /// Re-publish table rows with <time column> >= this timestamp, in time order
    /// (`created_at DEFAULT now()` is the inserting transaction's start time, not
    /// its commit: start a few minutes earlier than the first event you need)
    #[arg(long, value_name = "TIMESTAMP", env = "OUTBOX_RELAY_FROM_TIME")]
    pub from_time: Option<String>,
    /// With --from-time: first timestamp to exclude (exclusive)
    #[arg(
        long,
        value_name = "TIMESTAMP",
        env = "OUTBOX_RELAY_TO_TIME",
        requires = "from_time"
    )]
    pub to_time: Option<String>,
    /// With --from-time: the timestamp column [default: created_at]
    #[arg(
        long,
        value_name = "COLUMN",
        env = "OUTBOX_RELAY_TIME_COLUMN",
        default_value = "created_at"
    )]
    pub time_column: String,
    /// Send every replayed record to this topic instead of its mapped one
    #[arg(long, value_name = "TOPIC", env = "OUTBOX_RELAY_TOPIC_OVERRIDE")]
    pub topic_override: Option<String>,
    /// With --from-id: replay by id even when the id column's type (uuid) is
    /// not in insertion order
    #[arg(long, env = "OUTBOX_RELAY_FORCE", requires = "from_id")]
    pub force: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct PeekArgs {
    /// How many pending records to show
    #[arg(
        long,
        value_name = "N",
        default_value_t = 10,
        env = "OUTBOX_RELAY_LIMIT"
    )]
    pub limit: usize,
    /// Peek this bookmark instead of the live slot (which is busy while the relay runs)
    #[arg(long, value_name = "NAME", env = "OUTBOX_RELAY_BOOKMARK")]
    pub bookmark: Option<String>,
    /// Print JSON lines
    #[arg(long, env = "OUTBOX_RELAY_JSON")]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON for scripts instead of the table
    #[arg(long, env = "OUTBOX_RELAY_JSON")]
    pub json: bool,
    /// Exit 3 when the slot retains more WAL than this, e.g. 10GiB
    #[arg(long, value_name = "BYTES", env = "OUTBOX_RELAY_MAX_RETAINED_BYTES", value_parser = parse_byte_size)]
    pub max_retained_bytes: Option<usize>,
    /// Exit 5 when a bookmark slot retains more WAL than this, e.g. 1GiB (a
    /// bookmark left behind by a killed replay or --keep-bookmark) [default: no limit]
    #[arg(long, value_name = "BYTES", env = "OUTBOX_RELAY_MAX_BOOKMARK_RETAINED_BYTES", value_parser = parse_byte_size)]
    pub max_bookmark_retained_bytes: Option<usize>,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Sample events the writer inserts per second
    #[arg(
        long,
        value_name = "N",
        default_value_t = 20,
        env = "OUTBOX_RELAY_RATE"
    )]
    pub rate: u32,
    /// Stop after this many events arrived (default: run until Ctrl-C)
    #[arg(long, value_name = "N", env = "OUTBOX_RELAY_COUNT")]
    pub count: Option<u64>,
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// The flags that override settings, shared by every command that connects.
#[derive(Debug, Default, Args)]
pub struct ConfigArgs {
    #[command(flatten)]
    pub postgres: PostgresArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub mapping: MappingArgs,
    #[command(flatten)]
    pub relay: RelayArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Default, Args)]
#[command(next_help_heading = "PostgreSQL")]
pub struct PostgresArgs {
    /// Connection: postgres://USER[:PASSWORD]@HOST[:PORT]/DB or 'host=.. user=.. dbname=..'
    #[arg(
        long,
        value_name = "URL",
        env = "OUTBOX_RELAY_POSTGRES_URL",
        hide_env_values = true
    )]
    pub postgres_url: Option<String>,

    /// File holding the password (overrides the URL's; or set OUTBOX_RELAY_POSTGRES_PASSWORD)
    #[arg(long, value_name = "FILE", env = "OUTBOX_RELAY_POSTGRES_PASSWORD_FILE")]
    pub postgres_password_file: Option<PathBuf>,

    /// Outbox table, schema.table [default: public.outbox_events]
    #[arg(long, value_name = "TABLE", env = "OUTBOX_RELAY_TABLE")]
    pub table: Option<TableName>,

    /// Logical replication slot [default: outbox_relay]
    #[arg(long, value_name = "NAME", env = "OUTBOX_RELAY_SLOT")]
    pub slot: Option<String>,

    /// Publication to stream [default: outbox_relay]
    #[arg(long, value_name = "NAME", env = "OUTBOX_RELAY_PUBLICATION")]
    pub publication: Option<String>,

    /// Do not create a missing slot (a missing slot is then an error)
    #[arg(long, value_name = "BOOL", env = "OUTBOX_RELAY_NO_CREATE_SLOT",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub no_create_slot: Option<bool>,

    /// PostgreSQL 17+: create the slot without FAILOVER (it is then not synchronised
    /// to standbys and a failover loses it)
    #[arg(long, value_name = "BOOL", env = "OUTBOX_RELAY_NO_FAILOVER_SLOT",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub no_failover_slot: Option<bool>,

    /// Do not create a missing publication (a missing publication is then an error)
    #[arg(long, value_name = "BOOL", env = "OUTBOX_RELAY_NO_CREATE_PUBLICATION",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub no_create_publication: Option<bool>,

    /// application_name of the relay's connections [default: outbox-relay]
    #[arg(long, value_name = "NAME", env = "OUTBOX_RELAY_APPLICATION_NAME")]
    pub application_name: Option<String>,

    /// Period of standby status updates [default: 1s]
    #[arg(long, value_name = "DURATION", env = "OUTBOX_RELAY_STATUS_INTERVAL", value_parser = parse_duration)]
    pub status_interval: Option<Duration>,

    /// Connection timeout [default: 10s]
    #[arg(long, value_name = "DURATION", env = "OUTBOX_RELAY_CONNECT_TIMEOUT", value_parser = parse_duration)]
    pub connect_timeout: Option<Duration>,

    /// Largest replication message accepted, e.g. 64MiB [default: 64MiB]
    #[arg(long, value_name = "BYTES", env = "OUTBOX_RELAY_MAX_FRAME_BYTES", value_parser = parse_byte_size)]
    pub max_frame_bytes: Option<usize>,
}

impl fmt::Debug for PostgresArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresArgs")
            .field(
                "postgres_url",
                &self
                    .postgres_url
                    .as_deref()
                    .map(config::redact_connection_string),
            )
            .field("postgres_password_file", &self.postgres_password_file)
            .field("table", &self.table)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("no_create_slot", &self.no_create_slot)
            .field("no_create_publication", &self.no_create_publication)
            .field("no_failover_slot", &self.no_failover_slot)
            .field("application_name", &self.application_name)
            .field("status_interval", &self.status_interval)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .finish()
    }
}

#[derive(Default, Args)]
#[command(next_help_heading = "Kafka")]
pub struct KafkaArgs {
    /// Bootstrap brokers, host:port[,host:port...]
    #[arg(long, value_name = "BROKERS", env = "OUTBOX_RELAY_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    /// librdkafka property, e.g. compression.type=zstd (repeatable; no environment variable)
    #[arg(long = "kafka-property", value_name = "KEY=VALUE", value_parser = parse_kafka_property)]
    pub kafka_properties: Vec<(String, String)>,

    /// Do not create missing topics (a missing topic is then an error)
    #[arg(long, value_name = "BOOL", env = "OUTBOX_RELAY_NO_CREATE_TOPICS",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub no_create_topics: Option<bool>,

    /// Partitions of created topics [default: 1]
    #[arg(long, value_name = "N", env = "OUTBOX_RELAY_TOPIC_PARTITIONS")]
    pub topic_partitions: Option<i32>,

    /// Replication factor of created topics; -1 = the broker's default [default: -1]
    #[arg(
        long,
        value_name = "N",
        env = "OUTBOX_RELAY_TOPIC_REPLICATION_FACTOR",
        allow_negative_numbers = true
    )]
    pub topic_replication_factor: Option<i32>,

    /// Transport to the brokers: plaintext, ssl, sasl_plaintext, sasl_ssl [default: plaintext;
    /// ssl when --kafka-ssl-ca/-cert/-key are given]
    #[arg(
        long,
        value_name = "PROTOCOL",
        env = "OUTBOX_RELAY_KAFKA_SECURITY_PROTOCOL",
        ignore_case = true
    )]
    pub kafka_security_protocol: Option<config::KafkaSecurityProtocol>,

    /// CA certificate(s) to verify the brokers with (PEM file) [default: the system's]
    #[arg(long, value_name = "FILE", env = "OUTBOX_RELAY_KAFKA_SSL_CA")]
    pub kafka_ssl_ca: Option<PathBuf>,

    /// Client certificate for TLS client authentication (PEM file)
    #[arg(long, value_name = "FILE", env = "OUTBOX_RELAY_KAFKA_SSL_CERT")]
    pub kafka_ssl_cert: Option<PathBuf>,

    /// Private key of --kafka-ssl-cert (PEM file)
    #[arg(long, value_name = "FILE", env = "OUTBOX_RELAY_KAFKA_SSL_KEY")]
    pub kafka_ssl_key: Option<PathBuf>,

    /// SASL mechanism: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    #[arg(
        long,
        value_name = "MECHANISM",
        env = "OUTBOX_RELAY_KAFKA_SASL_MECHANISM",
        ignore_case = true
    )]
    pub kafka_sasl_mechanism: Option<config::KafkaSaslMechanism>,

    /// SASL user name
    #[arg(long, value_name = "USER", env = "OUTBOX_RELAY_KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,

    /// File holding the SASL password (or set OUTBOX_RELAY_KAFKA_SASL_PASSWORD)
    #[arg(
        long,
        value_name = "FILE",
        env = "OUTBOX_RELAY_KAFKA_SASL_PASSWORD_FILE"
    )]
    pub kafka_sasl_password_file: Option<PathBuf>,
}

impl fmt::Debug for KafkaArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props = config::redacted_properties(
            self.kafka_properties
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        f.debug_struct("KafkaArgs")
            .field("kafka_brokers", &self.kafka_brokers)
            .field("kafka_properties", &props)
            .field("no_create_topics", &self.no_create_topics)
            .field("topic_partitions", &self.topic_partitions)
            .field("topic_replication_factor", &self.topic_replication_factor)
            .field("kafka_security_protocol", &self.kafka_security_protocol)
            .field("kafka_ssl_ca", &self.kafka_ssl_ca)
            .field("kafka_ssl_cert", &self.kafka_ssl_cert)
            .field("kafka_ssl_key", &self.kafka_ssl_key)
            .field("kafka_sasl_mechanism", &self.kafka_sasl_mechanism)
            .field("kafka_sasl_username", &self.kafka_sasl_username)
            .field("kafka_sasl_password_file", &self.kafka_sasl_password_file)
            .finish()
    }
}

#[derive(Debug, Default, Args)]
#[command(next_help_heading = "Record mapping")]
pub struct MappingArgs {
    /// Column sent as header `id` [default: id]
    #[arg(long, value_name = "COLUMN", env = "OUTBOX_RELAY_ID_COLUMN")]
    pub id_column: Option<String>,

    /// Column used as the record key [default: aggregateid]
    #[arg(long, value_name = "COLUMN", env = "OUTBOX_RELAY_KEY_COLUMN")]
    pub key_column: Option<String>,

    /// Column whose value picks the topic [default: aggregatetype]
    #[arg(long, value_name = "COLUMN", env = "OUTBOX_RELAY_ROUTE_COLUMN")]
    pub route_column: Option<String>,

    /// Column used as the record value [default: payload]
    #[arg(long, value_name = "COLUMN", env = "OUTBOX_RELAY_PAYLOAD_COLUMN")]
    pub payload_column: Option<String>,

    /// Column sent as header `type`; "" for none [default: type]
    #[arg(long, value_name = "COLUMN", env = "OUTBOX_RELAY_TYPE_COLUMN")]
    pub type_column: Option<String>,

    /// Topic name template [default: outbox.event.${routedByValue}]
    #[arg(long, value_name = "TEMPLATE", env = "OUTBOX_RELAY_TOPIC_TEMPLATE")]
    pub topic_template: Option<String>,

    /// One fixed topic for every record (overrides the template)
    #[arg(long, value_name = "TOPIC", env = "OUTBOX_RELAY_TOPIC")]
    pub topic: Option<String>,

    /// Extra column sent as a header of the same name (repeatable, or comma-separated)
    #[arg(
        long = "header-column",
        value_name = "COLUMN",
        env = "OUTBOX_RELAY_HEADER_COLUMN",
        value_delimiter = ','
    )]
    pub header_columns: Vec<String>,

    /// Do not add the provenance headers (commit LSN, transaction id, commit time)
    #[arg(long, value_name = "BOOL", env = "OUTBOX_RELAY_NO_PROVENANCE_HEADERS",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub no_provenance_headers: Option<bool>,

    /// What the payload column holds: under json, a payload of a non-JSON column
    /// type (text, bytea...) that is not valid JSON is poison (class
    /// invalid_payload); json/jsonb columns are valid by construction [default: raw]
    #[arg(
        long,
        value_name = "FORMAT",
        env = "OUTBOX_RELAY_PAYLOAD_FORMAT",
        value_enum
    )]
    pub payload_format: Option<config::PayloadFormat>,

    /// Prefix of the transactional logical decoding messages
    /// (pg_logical_emit_message) that carry events [default: outbox]
    #[arg(long, value_name = "PREFIX", env = "OUTBOX_RELAY_MESSAGE_PREFIX")]
    pub message_prefix: Option<String>,

    /// Relay no logical decoding messages, only outbox table rows
    #[arg(long, value_name = "BOOL", env = "OUTBOX_RELAY_NO_MESSAGES",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub no_messages: Option<bool>,
    /// Record envelope: none (records as before), cloudevents-binary (ce_*
    /// headers, value = payload) or cloudevents-structured (value =
    /// application/cloudevents+json) [default: none]
    #[arg(long, value_name = "MODE", env = "OUTBOX_RELAY_ENVELOPE", value_enum)]
    pub envelope: Option<crate::envelope::EnvelopeMode>,

    /// CloudEvents `source` attribute [default: /outbox-relay/<database>/<table>]
    #[arg(long, value_name = "URI-REFERENCE", env = "OUTBOX_RELAY_CE_SOURCE")]
    pub ce_source: Option<String>,

    /// Column carried as header `traceparent` (W3C trace context); "" for none
    /// [default: traceparent, when the table has it]
    #[arg(long, value_name = "COLUMN", env = "OUTBOX_RELAY_TRACE_COLUMN")]
    pub trace_column: Option<String>,

    /// Column carried as header `tracestate`; "" for none [default: tracestate,
    /// when the table has it]
    #[arg(long, value_name = "COLUMN", env = "OUTBOX_RELAY_TRACESTATE_COLUMN")]
    pub tracestate_column: Option<String>,
}

#[derive(Debug, Default, Args)]
#[command(next_help_heading = "Relay")]
pub struct RelayArgs {
    /// Records sent but not yet acknowledged, at most [default: 20000]
    #[arg(long, value_name = "N", env = "OUTBOX_RELAY_MAX_IN_FLIGHT_RECORDS")]
    pub max_in_flight_records: Option<usize>,

    /// Bytes sent but not yet acknowledged, at most [default: 16MiB]
    #[arg(long, value_name = "BYTES", env = "OUTBOX_RELAY_MAX_IN_FLIGHT_BYTES", value_parser = parse_byte_size)]
    pub max_in_flight_bytes: Option<usize>,

    /// How long SIGTERM waits for acknowledgements [default: 30s]
    #[arg(long, value_name = "DURATION", env = "OUTBOX_RELAY_SHUTDOWN_TIMEOUT", value_parser = parse_duration)]
    pub shutdown_timeout: Option<Duration>,

    /// First delay before reconnecting [default: 500ms]
    #[arg(long, value_name = "DURATION", env = "OUTBOX_RELAY_RECONNECT_BACKOFF_MIN", value_parser = parse_duration)]
    pub reconnect_backoff_min: Option<Duration>,

    /// Longest delay between reconnects [default: 30s]
    #[arg(long, value_name = "DURATION", env = "OUTBOX_RELAY_RECONNECT_BACKOFF_MAX", value_parser = parse_duration)]
    pub reconnect_backoff_max: Option<Duration>,

    /// Address for /metrics, /healthz and /readyz, or `off` [default: 127.0.0.1:9187]
    #[arg(long, value_name = "ADDR", env = "OUTBOX_RELAY_HTTP_LISTEN")]
    pub http_listen: Option<String>,

    /// /readyz fails when records are in flight and none was acknowledged for this long [default: 30s]
    #[arg(long, value_name = "DURATION", env = "OUTBOX_RELAY_READY_STALL_TIMEOUT", value_parser = parse_duration)]
    pub ready_stall_timeout: Option<Duration>,

    /// OTLP/HTTP collector (http://host:4318) for one span per record, commit to
    /// broker acknowledgement; off when unset [default: off]
    #[arg(long, value_name = "URL", env = "OUTBOX_RELAY_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Topic for rows that can never become a valid record (poison rows)
    #[arg(long, value_name = "TOPIC", env = "OUTBOX_RELAY_DEAD_LETTER_TOPIC")]
    pub dead_letter_topic: Option<String>,

    /// Poison-row policy, `stop` or `dead-letter`, for all classes or as
    /// CLASS=POLICY (null_column, invalid_payload, invalid_topic, too_large,
    /// missing_column, bad_value, rejected_by_broker) [default: dead-letter with
    /// --dead-letter-topic, else stop]
    #[arg(
        long,
        value_name = "[CLASS=]POLICY",
        env = "OUTBOX_RELAY_POISON_POLICY",
        value_delimiter = ','
    )]
    pub poison_policy: Vec<String>,

    /// Pause between attempts while another process holds the slot [default: 2s]
    #[arg(long, value_name = "DURATION", env = "OUTBOX_RELAY_SLOT_BUSY_RETRY", value_parser = parse_duration)]
    pub slot_busy_retry: Option<Duration>,

    /// Terminate a walsender that holds the slot under our application_name but
    /// sent no status reply for --stale-holder-timeout (a dead relay's half-open connection)
    #[arg(long, value_name = "BOOL", env = "OUTBOX_RELAY_TERMINATE_STALE_HOLDER",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub terminate_stale_holder: Option<bool>,

    /// See --terminate-stale-holder [default: 30s]
    #[arg(long, value_name = "DURATION", env = "OUTBOX_RELAY_STALE_HOLDER_TIMEOUT", value_parser = parse_duration)]
    pub stale_holder_timeout: Option<Duration>,

    /// Delete outbox rows once the slot's confirmed position passed their
    /// transaction, by primary key in batches (needs DELETE on the table) [default: off]
    #[arg(long, value_name = "BOOL", env = "OUTBOX_RELAY_DELETE_DELIVERED",
          num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub delete_delivered: Option<bool>,
}

#[derive(Debug, Default, Args)]
#[command(next_help_heading = "Logging")]
pub struct LogArgs {
    /// Log format [default: text]
    #[arg(long, value_name = "FORMAT", env = "OUTBOX_RELAY_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Log filter, tracing EnvFilter syntax, e.g. info,outbox_relay=debug [default: info]
    #[arg(long, value_name = "FILTER", env = "OUTBOX_RELAY_LOG_FILTER")]
    pub log_filter: Option<String>,
}

/// `KEY=VALUE` for `--kafka-property`. The value may contain `=`; the key may not be
/// blank. The message never repeats the argument (it may hold a secret).
pub fn parse_kafka_property(arg: &str) -> Result<(String, String), String> {
    let (key, value) = arg
        .split_once('=')
        .ok_or("expected KEY=VALUE with a librdkafka property name, e.g. compression.type=zstd")?;
    if key.trim().is_empty() {
        return Err("the property name before '=' is empty; expected KEY=VALUE".into());
    }
    if key.trim() != key || key.contains(char::is_whitespace) {
        return Err(
            "the property name contains blanks; expected KEY=VALUE, e.g. linger.ms=5".into(),
        );
    }
    Ok((key.to_string(), value.to_string()))
}

impl ConfigArgs {
    /// The settings these flags (and their environment variables) give.
    pub fn to_layer(&self) -> Layer {
        let (p, k, m, r, l) = (
            &self.postgres,
            &self.kafka,
            &self.mapping,
            &self.relay,
            &self.log,
        );
        Layer {
            postgres: PostgresLayer {
                url: p.postgres_url.clone(),
                password: None,
                password_file: p.postgres_password_file.clone(),
                slot: p.slot.clone(),
                publication: p.publication.clone(),
                table: p.table.clone(),
                create_slot: p.no_create_slot.map(|no| !no),
                create_publication: p.no_create_publication.map(|no| !no),
                failover_slot: p.no_failover_slot.map(|no| !no),
                application_name: p.application_name.clone(),
                status_interval: p.status_interval,
                connect_timeout: p.connect_timeout,
                max_frame_bytes: p.max_frame_bytes,
            },
            kafka: KafkaLayer {
                brokers: k.kafka_brokers.clone(),
                properties: k.kafka_properties.iter().cloned().collect(),
                create_topics: k.no_create_topics.map(|no| !no),
                topic_partitions: k.topic_partitions,
                topic_replication_factor: k.topic_replication_factor,
                security_protocol: k.kafka_security_protocol,
                ssl_ca: k.kafka_ssl_ca.clone(),
                ssl_cert: k.kafka_ssl_cert.clone(),
                ssl_key: k.kafka_ssl_key.clone(),
                sasl_mechanism: k.kafka_sasl_mechanism,
                sasl_username: k.kafka_sasl_username.clone(),
                sasl_password: None,
                sasl_password_file: k.kafka_sasl_password_file.clone(),
            },
            mapping: MappingLayer {
                id_column: m.id_column.clone(),
                key_column: m.key_column.clone(),
                route_column: m.route_column.clone(),
                payload_column: m.payload_column.clone(),
                type_column: m.type_column.clone(),
                topic_template: m.topic_template.clone(),
                topic: m.topic.clone(),
                header_columns: (!m.header_columns.is_empty()).then(|| m.header_columns.clone()),
                provenance_headers: m.no_provenance_headers.map(|no| !no),
                payload_format: m.payload_format,
                messages: m.no_messages.map(|no| !no),
                message_prefix: m.message_prefix.clone(),
                envelope: m.envelope,
                ce_source: m.ce_source.clone(),
                trace_column: m.trace_column.clone(),
                tracestate_column: m.tracestate_column.clone(),
            },
            relay: RelayLayer {
                max_in_flight_records: r.max_in_flight_records,
                max_in_flight_bytes: r.max_in_flight_bytes,
                shutdown_timeout: r.shutdown_timeout,
                reconnect_backoff_min: r.reconnect_backoff_min,
                reconnect_backoff_max: r.reconnect_backoff_max,
                http_listen: r.http_listen.clone(),
                ready_stall_timeout: r.ready_stall_timeout,
                otlp_endpoint: r.otlp_endpoint.clone(),
                dead_letter_topic: r.dead_letter_topic.clone(),
                poison_policy: (!r.poison_policy.is_empty()).then(|| {
                    r.poison_policy
                        .iter()
                        .map(|p| match p.split_once('=') {
                            Some((class, policy)) => (class.trim().to_string(), policy.to_string()),
                            None => ("*".to_string(), p.clone()),
                        })
                        .collect()
                }),
                slot_busy_retry: r.slot_busy_retry,
                terminate_stale_holder: r.terminate_stale_holder,
                stale_holder_timeout: r.stale_holder_timeout,
                delete_delivered: r.delete_delivered,
            },
            log: LogLayer {
                format: l.log_format,
                filter: l.log_filter.clone(),
            },
        }
    }
}

/// `OUTBOX_RELAY_*` variables that are not relay settings but knobs of the test
/// harness and `.ci/install-deps`; a relay started by the tests inherits them, so
/// they are not rejected.
pub const NON_SETTING_ENV_VARS: &[&str] = &[
    "OUTBOX_RELAY_DEPS_DIR",
    "OUTBOX_RELAY_PG15_BINDIR",
    "OUTBOX_RELAY_PG17_BINDIR",
    "OUTBOX_RELAY_TANSU",
    "OUTBOX_RELAY_TANSU_LOG",
    "OUTBOX_RELAY_TEST_TMPDIR",
    "OUTBOX_RELAY_KEEP_TEMP",
];

/// The configuration from defaults, the `--config` file, the environment and flags.
pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
    let env = std::env::vars_os()
        .filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            k.starts_with(ENV_PREFIX)
                .then(|| (k, v.to_string_lossy().into_owned()))
        })
        .collect();
    load_with_env(cli, &env)
}

/// [`load`] with the environment given as a map (only `OUTBOX_RELAY_*` entries
/// matter). clap has already resolved flags and their variables into `cli`; the map
/// serves to reject unknown variables and to read `OUTBOX_RELAY_POSTGRES_PASSWORD`.
pub fn load_with_env(cli: &Cli, env: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
    let mut problems = unknown_env_vars(env);
    let file = match &cli.config_file {
        None => Layer::default(),
        Some(path) => match Layer::from_toml_file(path) {
            Ok(layer) => layer,
            Err(problem) => {
                problems.push(problem);
                return Err(ConfigError::Invalid(problems));
            }
        },
    };
    let mut top = cli
        .command
        .config_args()
        .map(ConfigArgs::to_layer)
        .unwrap_or_default();
    if top.kafka.brokers.is_none() {
        match cli.command {
            // The demo brings its own in-process broker and fills this in.
            Command::Demo(_) => top.kafka.brokers = Some("demo-mock-cluster:9092".to_string()),
            // These read PostgreSQL only.
            Command::Status(_) | Command::Bookmark(_) | Command::Peek(_) => {
                top.kafka.brokers = Some("unused-by-this-command:9092".to_string())
            }
            _ => {}
        }
    }
    top.postgres.password = env
        .get(ENV_POSTGRES_PASSWORD)
        .filter(|p| !p.is_empty())
        .cloned();
    top.kafka.sasl_password = env
        .get(config::ENV_KAFKA_SASL_PASSWORD)
        .filter(|p| !p.is_empty())
        .cloned();
    match Config::from_layer(file.overlay(top)) {
        Ok(config) if problems.is_empty() => Ok(config),
        Ok(_) => Err(ConfigError::Invalid(problems)),
        Err(ConfigError::Invalid(more)) => {
            problems.extend(more);
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// Every environment variable name some flag of some command reads, plus the
/// environment-only ones.
pub fn known_env_vars() -> Vec<String> {
    fn walk(cmd: &clap::Command, out: &mut Vec<String>) {
        out.extend(
            cmd.get_arguments()
                .filter_map(|a| a.get_env()?.to_str().map(str::to_string)),
        );
        for sub in cmd.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut names = vec![
        ENV_POSTGRES_PASSWORD.to_string(),
        config::ENV_KAFKA_SASL_PASSWORD.to_string(),
    ];
    walk(&Cli::command(), &mut names);
    names.sort();
    names.dedup();
    names
}

/// Unknown `OUTBOX_RELAY_*` variables, except the harness's knobs and the
/// Kubernetes service links of a Service named `outbox-relay[-*]` (see
/// [`service_links`]).
fn unknown_env_vars(env: &BTreeMap<String, String>) -> Vec<Problem> {
    let known = known_env_vars();
    env.iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .filter(|(k, _)| !known.contains(k) && !NON_SETTING_ENV_VARS.contains(&k.as_str()))
        .filter(|(k, v)| !service_links::is_service_link(k, v, env))
        .map(|(name, _)| {
            let fix = if name.starts_with("OUTBOX_RELAY_KAFKA_PROPERT") {
                "Kafka properties have no environment variable: use --kafka-property KEY=VALUE \
                 or [kafka.properties] in the config file, and unset it"
                    .to_string()
            } else {
                let nearest = known.iter().min_by_key(|k| edit_distance(k, name));
                match nearest.filter(|k| edit_distance(k, name) <= 3) {
                    Some(k) => format!("rename it to {k}, or unset it"),
                    None => {
                        "unset it (each flag's variable is listed in `outbox-relay run --help`)"
                            .to_string()
                    }
                }
            };
            Problem::new(format!("unknown environment variable {name}"), fix)
        })
        .collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Parses `args` with the environment taken from `env` instead of the process, with
/// exactly clap's semantics: each variable in `env` becomes its flag's fallback
/// value, which clap parses through the same path as an environment value (a flag
/// on the command line still wins). For tests; `Cli::parse()` is the real thing.
pub fn try_parse_with_env<I, T>(args: I, env: &BTreeMap<String, String>) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    fn rewire(cmd: clap::Command, env: &BTreeMap<String, String>) -> clap::Command {
        cmd.mut_args(|arg| {
            let Some(name) = arg.get_env().and_then(|n| n.to_str()).map(str::to_string) else {
                return arg;
            };
            let arg = arg.env(None);
            match env.get(&name) {
                // clap's default values must be 'static without its `string` feature;
                // this runs once per parse, in tests.
                Some(value) => arg.default_value(&*Box::leak(value.clone().into_boxed_str())),
                None => arg,
            }
        })
        .mut_subcommands(|sub| rewire(sub, env))
    }
    let matches = rewire(Cli::command(), env).try_get_matches_from(args)?;
    Cli::from_arg_matches(&matches)
}

pub mod service_links;

#[cfg(test)]
mod tests;
