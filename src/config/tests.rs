//! Layering, validation and redaction, through the same path as the binary:
//! clap (flags and environment) → `cli::load_with_env` → `Config::from_layer`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use super::*;
use crate::cli::{load_with_env, try_parse_with_env};

const URL: &str = "postgres://relay:hunter2@db.example:5432/app";

/// `outbox-relay [--config FILE] run ARGS` with environment `env`, loaded.
fn load(toml: Option<&str>, env: &[(&str, &str)], args: &[&str]) -> Result<Config, ConfigError> {
    let env: BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let file = toml.map(|text| {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    });
    let mut argv: Vec<String> = vec!["outbox-relay".into()];
    if let Some(f) = &file {
        argv.extend(["--config".into(), f.path().display().to_string()]);
    }
    argv.push("run".into());
    argv.extend(args.iter().map(|s| s.to_string()));
    let cli = try_parse_with_env(argv, &env).unwrap_or_else(|e| panic!("{e}"));
    load_with_env(&cli, &env)
}

/// The minimum that validates, as flags.
const MIN: &[&str] = &["--postgres-url", URL, "--kafka-brokers", "k:9092"];

fn ok(toml: Option<&str>, env: &[(&str, &str)], args: &[&str]) -> Config {
    let args: Vec<&str> = MIN.iter().chain(args).copied().collect();
    load(toml, env, &args).unwrap_or_else(|e| panic!("{e}"))
}

fn problems(toml: Option<&str>, env: &[(&str, &str)], args: &[&str]) -> Vec<String> {
    match load(toml, env, args) {
        Ok(c) => panic!("expected problems, got {c:?}"),
        Err(e) => e.problems().iter().map(|p| p.to_string()).collect(),
    }
}

#[test]
fn defaults_fill_everything_left_unset() {
    let c = ok(None, &[], &[]);
    let want = Config {
        postgres: PostgresConfig {
            url: URL.into(),
            ..Default::default()
        },
        kafka: KafkaConfig {
            brokers: "k:9092".into(),
            ..Default::default()
        },
        ..Default::default()
    };
    assert_eq!(c, want);
    assert_eq!(c.postgres.table, TableName::new("public", "outbox_events"));
    assert_eq!(c.postgres.status_interval, Duration::from_secs(1));
    assert_eq!(c.mapping.type_column.as_deref(), Some("type"));
    assert_eq!(c.mapping.topic_template, "outbox.event.${routedByValue}");
    assert_eq!(c.relay.max_in_flight_bytes, 16 << 20);
    assert_eq!(c.log.format, LogFormat::Text);
}

#[test]
fn precedence_is_default_then_toml_then_env_then_flag() {
    let toml = r#"
        [postgres]
        slot = "from_toml"
        status_interval = "2s"
        create_slot = false
        [relay]
        max_in_flight_records = 10
        [log]
        format = "json"
        [mapping]
        header_columns = ["toml_h"]
    "#;
    let env = [
        ("OUTBOX_RELAY_SLOT", "from_env"),
        ("OUTBOX_RELAY_STATUS_INTERVAL", "3s"),
        ("OUTBOX_RELAY_MAX_IN_FLIGHT_RECORDS", "20"),
        ("OUTBOX_RELAY_NO_CREATE_SLOT", "false"),
        ("OUTBOX_RELAY_HEADER_COLUMN", "env_a,env_b"),
    ];
    let flags = [
        "--slot",
        "from_flag",
        "--status-interval",
        "4s",
        "--max-in-flight-records",
        "30",
        "--no-create-slot",
        "--log-format",
        "text",
        "--header-column",
        "flag_h",
    ];

    let d = ok(None, &[], &[]);
    assert_eq!(
        (
            d.postgres.slot.as_str(),
            d.postgres.status_interval,
            d.relay.max_in_flight_records
        ),
        (
            DEFAULT_SLOT,
            DEFAULT_STATUS_INTERVAL,
            DEFAULT_MAX_IN_FLIGHT_RECORDS
        )
    );
    assert!(d.postgres.create_slot);

    let t = ok(Some(toml), &[], &[]);
    assert_eq!(
        (
            t.postgres.slot.as_str(),
            t.postgres.status_interval,
            t.relay.max_in_flight_records
        ),
        ("from_toml", Duration::from_secs(2), 10)
    );
    assert!(!t.postgres.create_slot);
    assert_eq!(
        (t.log.format, t.mapping.header_columns.clone()),
        (LogFormat::Json, vec!["toml_h".to_string()])
    );

    let e = ok(Some(toml), &env, &[]);
    assert_eq!(
        (
            e.postgres.slot.as_str(),
            e.postgres.status_interval,
            e.relay.max_in_flight_records
        ),
        ("from_env", Duration::from_secs(3), 20)
    );
    // OUTBOX_RELAY_NO_CREATE_SLOT=false is an explicit "create it", over the file.
    assert!(e.postgres.create_slot);
    assert_eq!(e.mapping.header_columns, ["env_a", "env_b"]);

    let f = ok(Some(toml), &env, &flags);
    assert_eq!(
        (
            f.postgres.slot.as_str(),
            f.postgres.status_interval,
            f.relay.max_in_flight_records
        ),
        ("from_flag", Duration::from_secs(4), 30)
    );
    assert!(!f.postgres.create_slot);
    assert_eq!(
        (f.log.format, f.mapping.header_columns.clone()),
        (LogFormat::Text, vec!["flag_h".to_string()])
    );
}

#[test]
fn kafka_properties_merge_key_by_key() {
    let toml = r#"
        [kafka.properties]
        "compression.type" = "lz4"
        "linger.ms" = 5
        "socket.keepalive.enable" = true
    "#;
    let c = ok(
        Some(toml),
        &[],
        &[
            "--kafka-property",
            "compression.type=zstd",
            "--kafka-property",
            "batch.size=1000",
        ],
    );
    let props: Vec<(&str, &str)> = c
        .kafka
        .properties
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        props,
        [
            ("batch.size", "1000"),
            ("compression.type", "zstd"),
            ("linger.ms", "5"),
            ("socket.keepalive.enable", "true")
        ]
    );
}

#[test]
fn empty_type_column_and_topic_mean_none() {
    let c = ok(
        Some("[mapping]\ntype_column = \"\"\ntopic = \"\"\n"),
        &[],
        &[],
    );
    assert_eq!((c.mapping.type_column, c.mapping.topic), (None, None));
    let c = ok(None, &[], &["--type-column", "", "--topic", "events"]);
    assert_eq!(
        (c.mapping.type_column.as_deref(), c.mapping.topic.as_deref()),
        (None, Some("events"))
    );
    assert_eq!(
        c.mapping.required_columns(),
        ["id", "aggregateid", "payload"]
    );
}

#[test]
fn payload_format_from_each_layer() {
    assert_eq!(
        ok(None, &[], &[]).mapping.payload_format,
        PayloadFormat::Raw
    );
    let toml = "[mapping]\npayload_format = \"json\"\n";
    assert_eq!(
        ok(Some(toml), &[], &[]).mapping.payload_format,
        PayloadFormat::Json
    );
    let c = ok(Some(toml), &[("OUTBOX_RELAY_PAYLOAD_FORMAT", "raw")], &[]);
    assert_eq!(c.mapping.payload_format, PayloadFormat::Raw);
    let c = ok(
        Some(toml),
        &[("OUTBOX_RELAY_PAYLOAD_FORMAT", "raw")],
        &["--payload-format", "json"],
    );
    assert_eq!(c.mapping.payload_format, PayloadFormat::Json);
    let p = problems(Some("[mapping]\npayload_format = \"xml\"\n"), &[], MIN);
    assert!(
        p[0].contains("unknown variant `xml`") && p[0].contains("`json`"),
        "{p:?}"
    );
    let err = try_parse_with_env(
        ["outbox-relay", "run", "--payload-format", "xml"],
        &BTreeMap::new(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("json"), "{err}");
}

#[test]
fn table_name_from_toml_and_flag() {
    let c = ok(Some("[postgres]\ntable = 'app.\"Outbox\"'\n"), &[], &[]);
    assert_eq!(c.postgres.table, TableName::new("app", "Outbox"));
    assert_eq!(c.postgres.table.to_string(), "app.\"Outbox\"");
    let c = ok(None, &[("OUTBOX_RELAY_TABLE", "events")], &[]);
    assert_eq!(c.postgres.table, TableName::new("public", "events"));
    let err = try_parse_with_env(
        ["outbox-relay", "run", "--table", "a.b.c"],
        &BTreeMap::new(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("3 dot-separated parts"), "{err}");
    let p = problems(Some("[postgres]\ntable = \"my-table\"\n"), &[], MIN);
    assert!(p[0].contains("double-quote"), "{p:?}");
}

#[test]
fn unknown_toml_keys_are_named() {
    let p = problems(Some("[postgres]\nslott = \"x\"\n"), &[], MIN);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].contains("line 2")
            && p[0].contains("unknown field `slott`")
            && p[0].contains("`slot`"),
        "{p:?}"
    );
    let p = problems(Some("[postgress]\nurl = \"x\"\n"), &[], MIN);
    assert!(p[0].contains("unknown field `postgress`"), "{p:?}");
    let p = problems(Some("[postgres]\npassword = \"x\"\n"), &[], MIN);
    assert!(p[0].contains("unknown field `password`"), "{p:?}");
}

#[test]
fn toml_errors_do_not_quote_the_file() {
    let p = problems(Some(&format!("[postgres]\nurll = \"{URL}\"\n")), &[], MIN);
    assert!(
        p[0].contains("unknown field `urll`") && !p[0].contains("hunter2"),
        "{p:?}"
    );
}

#[test]
fn bad_toml_values_are_explained() {
    let p = problems(Some("[postgres]\nstatus_interval = 5\n"), &[], MIN);
    assert!(p[0].contains("\"5s\""), "{p:?}");
    let p = problems(
        Some("[relay]\nmax_in_flight_bytes = \"64 parsecs\"\n"),
        &[],
        MIN,
    );
    assert!(p[0].contains("unknown unit"), "{p:?}");
    let c = ok(
        Some("[relay]\nmax_in_flight_bytes = \"1MiB\"\n[postgres]\nmax_frame_bytes = 131072\n"),
        &[],
        &[],
    );
    assert_eq!(
        (c.relay.max_in_flight_bytes, c.postgres.max_frame_bytes),
        (1 << 20, 128 << 10)
    );
}

#[test]
fn unknown_environment_variables_are_rejected() {
    let p = problems(
        None,
        &[
            ("OUTBOX_RELAY_SLOTT", "x"),
            ("OUTBOX_RELAY_KAFKA_PROPERTY", "a=b"),
        ],
        MIN,
    );
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        p[0].contains("OUTBOX_RELAY_KAFKA_PROPERTY") && p[0].contains("--kafka-property"),
        "{p:?}"
    );
    assert!(
        p[1].contains("unknown environment variable OUTBOX_RELAY_SLOTT")
            && p[1].contains("rename it to OUTBOX_RELAY_SLOT"),
        "{p:?}"
    );
    // Other programs' variables and the test harness's knobs are not ours to judge.
    ok(
        None,
        &[("OUTBOXRELAY_X", "1"), ("OUTBOX_RELAY_TEST_TMPDIR", "/tmp")],
        &[],
    );
}

#[test]
fn kubernetes_service_links_are_ignored_and_typos_still_rejected() {
    // What the kubelet injects into every pod of a namespace with a Service
    // named `outbox-relay` (port 9187, named `http`).
    let links = [
        ("OUTBOX_RELAY_SERVICE_HOST", "10.96.12.34"),
        ("OUTBOX_RELAY_SERVICE_PORT", "9187"),
        ("OUTBOX_RELAY_SERVICE_PORT_HTTP", "9187"),
        ("OUTBOX_RELAY_PORT", "tcp://10.96.12.34:9187"),
        ("OUTBOX_RELAY_PORT_9187_TCP", "tcp://10.96.12.34:9187"),
        ("OUTBOX_RELAY_PORT_9187_TCP_PROTO", "tcp"),
        ("OUTBOX_RELAY_PORT_9187_TCP_PORT", "9187"),
        ("OUTBOX_RELAY_PORT_9187_TCP_ADDR", "10.96.12.34"),
    ];
    ok(None, &links, &[]);
    let mut with_typos = links.to_vec();
    with_typos.extend([
        ("OUTBOX_RELAY_SLOTT", "x"),
        ("OUTBOX_RELAY_POSTGRES_PORT", "5432"),
    ]);
    let p = problems(None, &with_typos, MIN);
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(p[0].contains("OUTBOX_RELAY_POSTGRES_PORT"), "{p:?}");
    assert!(p[1].contains("OUTBOX_RELAY_SLOTT"), "{p:?}");
}

#[test]
fn validation_lists_every_problem_at_once() {
    let toml = r#"
        [postgres]
        slot = "Bad-Slot"
        status_interval = "0s"
        [kafka]
        topic_partitions = 0
        [kafka.properties]
        acks = "1"
        [mapping]
        topic_template = "events.${aggregate}"
        header_columns = ["a", "a"]
        [relay]
        reconnect_backoff_min = "1m"
        reconnect_backoff_max = "1s"
        [log]
        filter = "info,[["
    "#;
    let p = problems(Some(toml), &[], &[]);
    let expect = [
        "PostgreSQL connection is not set",
        "not a valid replication slot name",
        "status_interval 0s",
        "no Kafka brokers",
        "topic_partitions is 0",
        "acks=1 weakens delivery",
        "lists \"a\" twice",
        "topic_template",
        "reconnect_backoff_min (1m) is above",
        "log filter",
    ];
    assert_eq!(p.len(), expect.len(), "{p:#?}");
    for (got, want) in p.iter().zip(expect) {
        assert!(got.contains(want), "{got:?} should mention {want:?}");
        assert!(got.contains(" — fix: "), "{got}");
    }
    let e = load(Some(toml), &[], &[]).unwrap_err().to_string();
    assert!(
        e.starts_with("invalid configuration (10 problems):\n  - "),
        "{e}"
    );
}

#[test]
fn connection_problems_come_from_the_url() {
    let p = problems(
        None,
        &[],
        &[
            "--postgres-url",
            "host=/run/postgresql dbname=app",
            "--kafka-brokers",
            "k",
        ],
    );
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(p[0].contains("Unix-domain socket") && p[0].contains("use a TCP host"));
    assert!(p[1].contains("no user"));
}

#[test]
fn password_sources() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pw");
    std::fs::write(&file, "from-file\n").unwrap();
    let file_arg = file.display().to_string();

    let c = ok(None, &[], &[]);
    assert_eq!(
        c.postgres
            .replication_connect_config()
            .unwrap()
            .password
            .as_deref(),
        Some("hunter2")
    );
    let c = ok(None, &[("OUTBOX_RELAY_POSTGRES_PASSWORD", "from-env")], &[]);
    assert_eq!(
        c.postgres
            .replication_connect_config()
            .unwrap()
            .password
            .as_deref(),
        Some("from-env")
    );
    assert_eq!(
        c.postgres.sql_config().unwrap().get_password(),
        Some(&b"from-env"[..])
    );
    let c = ok(None, &[], &["--postgres-password-file", &file_arg]);
    assert_eq!(c.postgres.password.as_deref(), Some("from-file"));
    let c = ok(
        Some(&format!("[postgres]\npassword_file = '{file_arg}'\n")),
        &[],
        &[],
    );
    assert_eq!(c.postgres.password.as_deref(), Some("from-file"));

    let p = problems(
        None,
        &[("OUTBOX_RELAY_POSTGRES_PASSWORD", "x")],
        &[MIN, &["--postgres-password-file", &file_arg]].concat(),
    );
    assert!(p[0].contains("keep one of them"), "{p:?}");
    let p = problems(
        None,
        &[],
        &[MIN, &["--postgres-password-file", "/nonexistent/pw"]].concat(),
    );
    assert!(
        p[0].contains("cannot read the PostgreSQL password file /nonexistent/pw"),
        "{p:?}"
    );
}

#[test]
fn url_application_name_and_timeout_sit_above_defaults_only() {
    let url = "postgres://relay@db/app?application_name=from-url&connect_timeout=3";
    let c = load(None, &[], &["--postgres-url", url, "--kafka-brokers", "k"]).unwrap();
    assert_eq!(c.postgres.application_name, "from-url");
    assert_eq!(c.postgres.connect_timeout, Duration::from_secs(3));
    let args = [
        "--postgres-url",
        url,
        "--kafka-brokers",
        "k",
        "--application-name",
        "mine",
        "--connect-timeout",
        "7s",
    ];
    let c = load(None, &[], &args).unwrap();
    assert_eq!(c.postgres.application_name, "mine");
    assert_eq!(
        c.postgres.sql_config().unwrap().get_application_name(),
        Some("mine")
    );
    assert_eq!(
        c.postgres.sql_config().unwrap().get_connect_timeout(),
        Some(&Duration::from_secs(7))
    );
}

#[test]
fn replication_connect_config_from_the_url() {
    let c = ok(None, &[], &["--max-frame-bytes", "1MiB"]);
    let r = c.postgres.replication_connect_config().unwrap();
    assert_eq!(
        (
            r.host.as_str(),
            r.port,
            r.user.as_str(),
            r.dbname.as_str(),
            r.application_name.as_str()
        ),
        ("db.example", 5432, "relay", "app", "outbox-relay")
    );
    assert_eq!(
        (r.connect_timeout, r.max_frame_bytes),
        (Duration::from_secs(10), 1 << 20)
    );
}

#[test]
fn debug_never_shows_passwords() {
    let mut c = ok(
        Some("[kafka.properties]\n\"sasl.password\" = \"swordfish\"\n\"ssl.key.pem\" = \"PEMDATA\"\n"),
        &[("OUTBOX_RELAY_POSTGRES_PASSWORD", "s3cret")],
        &["--kafka-property", "linger.ms=5"],
    );
    let debug = format!(
        "{c:?} {:?}",
        c.postgres.replication_connect_config().unwrap()
    );
    for secret in ["hunter2", "s3cret", "swordfish", "PEMDATA"] {
        assert!(!debug.contains(secret), "{secret} leaked: {debug}");
    }
    assert!(
        debug.contains("postgres://relay:<redacted>@db.example:5432/app"),
        "{debug}"
    );
    assert!(debug.contains("\"linger.ms\": \"5\""), "{debug}");
    c.postgres.url = "host=db user=relay password=topsecret".into();
    assert!(!format!("{c:?}").contains("topsecret"));
    let layer = Layer::from_toml_str(&format!("[postgres]\nurl = \"{URL}\"\n"), "t").unwrap();
    assert!(!format!("{layer:?}").contains("hunter2"));
}

#[test]
fn problem_display() {
    let p = Problem::new(
        "wal_level is 'replica'",
        "set wal_level = logical in postgresql.conf and restart PostgreSQL",
    );
    assert_eq!(
        p.to_string(),
        "wal_level is 'replica' — fix: set wal_level = logical in postgresql.conf and restart PostgreSQL"
    );
}

#[test]
fn kafka_properties_that_break_delivery_reports_or_order_are_rejected() {
    for (key, value, want) in [
        (
            "delivery.report.only.error",
            "true",
            "suppresses the delivery reports",
        ),
        (
            "transactional.id",
            "relay-1",
            "does not use Kafka transactions",
        ),
        (
            "max.in.flight.requests.per.connection",
            "6",
            "1 to 5 requests in flight",
        ),
        ("max.in.flight", "1000000", "1 to 5 requests in flight"),
        ("max.in.flight", "0", "1 to 5 requests in flight"),
        ("max.in.flight", "many", "1 to 5 requests in flight"),
    ] {
        let prop = format!("{key}={value}");
        let p = problems(None, &[], &[MIN, &["--kafka-property", &prop]].concat());
        assert_eq!(p.len(), 1, "{prop}: {p:?}");
        assert!(
            p[0].contains(want) && p[0].contains(key),
            "{prop}: {}",
            p[0]
        );
    }
    for (key, value) in [
        ("delivery.report.only.error", "false"),
        ("max.in.flight.requests.per.connection", "5"),
        ("max.in.flight", "1"),
    ] {
        let prop = format!("{key}={value}");
        let cfg = ok(None, &[], &["--kafka-property", &prop]);
        assert_eq!(
            cfg.kafka.properties.get(key).map(String::as_str),
            Some(value)
        );
    }
}

#[test]
fn envelope_trace_and_otlp_settings_from_each_layer() {
    use crate::envelope::EnvelopeMode;
    let d = ok(None, &[], &[]);
    assert_eq!(d.mapping.envelope, EnvelopeMode::None);
    assert_eq!(d.mapping.ce_source, None);
    assert_eq!(d.mapping.trace_column.as_deref(), Some("traceparent"));
    assert_eq!(d.mapping.tracestate_column.as_deref(), Some("tracestate"));
    assert_eq!(d.relay.otlp_endpoint, None);
    let toml = "[mapping]\nenvelope = \"cloudevents-structured\"\nce_source = \"urn:orders\"\n\
                trace_column = \"\"\ntracestate_column = \"ts\"\n\
                [relay]\notlp_endpoint = \"http://127.0.0.1:4318\"\n";
    let t = ok(Some(toml), &[], &[]);
    assert_eq!(t.mapping.envelope, EnvelopeMode::CloudeventsStructured);
    assert_eq!(t.mapping.ce_source.as_deref(), Some("urn:orders"));
    assert_eq!(t.mapping.trace_column, None, "\"\" turns it off");
    assert_eq!(t.mapping.tracestate_column.as_deref(), Some("ts"));
    assert_eq!(
        t.relay.otlp_endpoint.as_deref(),
        Some("http://127.0.0.1:4318")
    );
    let e = ok(
        Some(toml),
        &[
            ("OUTBOX_RELAY_ENVELOPE", "cloudevents-binary"),
            ("OUTBOX_RELAY_TRACE_COLUMN", "tp"),
        ],
        &["--otlp-endpoint", "http://c:4318", "--ce-source", "/x"],
    );
    assert_eq!(e.mapping.envelope, EnvelopeMode::CloudeventsBinary);
    assert_eq!(e.mapping.trace_column.as_deref(), Some("tp"));
    assert_eq!(e.relay.otlp_endpoint.as_deref(), Some("http://c:4318"));
    assert_eq!(e.mapping.ce_source.as_deref(), Some("/x"));
    let p = problems(Some("[mapping]\nenvelope = \"cloudevents\"\n"), &[], MIN);
    assert!(p[0].contains("cloudevents-binary"), "{p:?}");
    let p = problems(
        None,
        &[],
        &[
            MIN,
            &[
                "--envelope",
                "cloudevents-binary",
                "--header-column",
                "Tenant_Id",
            ],
        ]
        .concat(),
    );
    assert!(p.iter().any(|p| p.contains("\"Tenant_Id\"")), "{p:?}");
    let p = problems(
        None,
        &[],
        &[MIN, &["--otlp-endpoint", "https://c:4318"]].concat(),
    );
    assert!(p.iter().any(|p| p.contains("https")), "{p:?}");
}
