//! Transport security against real servers: PostgreSQL with TLS (a CA, server and
//! client certificates made here with rcgen), for both the replication connection
//! and the SQL connections, and Kafka SASL/SCRAM against tansu.
//!
//! What tansu 0.6 cannot show: it takes `--cert`/`--key` but does not serve TLS
//! with them (its acceptor is built and never used), so Kafka TLS is only checked as
//! far as librdkafka loading the CA file (`kafka_tls_settings_reach_librdkafka`);
//! and SASL/PLAIN never completes against it (requests time out), so only
//! SCRAM-SHA-256 and SCRAM-SHA-512 are tested against a broker.

mod harness;

use std::time::Duration;

use harness::security::{tls_cluster, Pki, SaslBroker, CERT_USER, PASSWORD, SCRAM_USER};
use harness::{unique_name, PgCluster, PgVersion};
use outbox_relay::config::PostgresConfig;
use outbox_relay::replication::{ReplicationClient, ReplicationError};

fn config(url: String, password: Option<&str>) -> PostgresConfig {
    PostgresConfig {
        url,
        password: password.map(str::to_string),
        connect_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

/// Whether the SQL connection fails with a TLS refusal (what `run` treats as
/// needing an operator, not a retry).
async fn sql_tls_refusal(cfg: &PostgresConfig) -> bool {
    match outbox_relay::sql::connect(cfg).await {
        Err(outbox_relay::sql::SqlConnectError::Postgres(e)) => {
            outbox_relay::sql::is_tls_refusal(&e)
        }
        _ => false,
    }
}

/// Opens a replication connection as `cfg` says; the connection or the error text.
async fn replication(cfg: &PostgresConfig) -> Result<ReplicationClient, String> {
    let connect = cfg
        .replication_connect_config()
        .map_err(|e| e.to_string())?;
    ReplicationClient::connect(&connect)
        .await
        .map_err(|e| match e {
            ReplicationError::Server(s) => format!("server {}: {}", s.code, s.message),
            other => other.to_string(),
        })
}

/// Opens an SQL connection as `cfg` says and reports whether it is TLS; or the
/// error with its sources.
async fn sql(cfg: &PostgresConfig) -> Result<bool, String> {
    let conn = outbox_relay::sql::connect(cfg).await.map_err(|e| {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        text
    })?;
    let row = conn
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    Ok(row.get(0))
}

async fn replication_ssl(pg: &PgCluster, pid: i32) -> bool {
    pg.socket_client()
        .await
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = $1", &[&pid])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sslmodes_certificates_and_channel_binding() {
    let pki = Pki::new();
    let pg = tls_cluster(PgVersion::V17, &pki).await;
    let port = pg.port();
    let ca = pki.path("ca.pem").display().to_string();
    let other_ca = pki.path("other-ca.pem").display().to_string();
    let scram = |host: &str, params: &str| {
        config(
            format!("postgres://{SCRAM_USER}@{host}:{port}/postgres?{params}"),
            Some(PASSWORD),
        )
    };

    // A plain connection to a hostssl-only server is refused, on both sides.
    let plain = scram("127.0.0.1", "sslmode=disable");
    let e = replication(&plain).await.unwrap_err();
    assert!(e.contains("28000") && e.contains("no encryption"), "{e}");
    let e = sql(&plain).await.unwrap_err();
    assert!(e.contains("no encryption"), "{e}");
    assert!(
        !sql_tls_refusal(&plain).await,
        "pg_hba refusal is not a TLS one"
    );

    // prefer (the default): TLS without checking the certificate, and SCRAM bound
    // to the channel since the server offers SCRAM-SHA-256-PLUS.
    for cfg in [scram("127.0.0.1", ""), scram("127.0.0.1", "sslmode=prefer")] {
        let client = replication(&cfg).await.unwrap();
        assert!(client.is_tls());
        assert_eq!(client.sasl_mechanism(), Some("SCRAM-SHA-256-PLUS"));
        assert!(replication_ssl(&pg, client.backend_pid()).await);
        assert_eq!(sql(&cfg).await, Ok(true));
    }
    // channel_binding=require only succeeds when PLUS was really used: that is how
    // the SQL side (tokio-postgres) shows it.
    let bound = scram("127.0.0.1", "sslmode=require&channel_binding=require");
    assert_eq!(
        replication(&bound).await.unwrap().sasl_mechanism(),
        Some("SCRAM-SHA-256-PLUS")
    );
    assert_eq!(sql(&bound).await, Ok(true));
    // channel_binding=disable: still TLS, plain SCRAM.
    let unbound = scram("127.0.0.1", "sslmode=require&channel_binding=disable");
    assert_eq!(
        replication(&unbound).await.unwrap().sasl_mechanism(),
        Some("SCRAM-SHA-256")
    );
    assert_eq!(sql(&unbound).await, Ok(true));

    // verify-full with the right host names.
    for host in ["localhost", "127.0.0.1"] {
        let cfg = scram(host, &format!("sslmode=verify-full&sslrootcert={ca}"));
        let client = replication(&cfg).await.unwrap();
        assert!(client.is_tls(), "{host}");
        assert_eq!(sql(&cfg).await, Ok(true), "{host}");
    }
    // ... and with a wrong one: the certificate is checked against `host`, while
    // `hostaddr` says where to connect (libpq's rule).
    let wrong = config(
        format!(
            "host=wrong.example hostaddr=127.0.0.1 port={port} user={SCRAM_USER} dbname=postgres \
             sslmode=verify-full sslrootcert={ca}"
        ),
        Some(PASSWORD),
    );
    let e = replication(&wrong).await.unwrap_err();
    assert!(e.contains("not valid for host \"wrong.example\""), "{e}");
    let e = sql(&wrong).await.unwrap_err();
    assert!(e.contains("not valid for host \"wrong.example\""), "{e}");
    assert!(sql_tls_refusal(&wrong).await);
    // verify-ca does not look at the name.
    let ca_only = config(
        wrong.url.replace("verify-full", "verify-ca"),
        Some(PASSWORD),
    );
    replication(&ca_only).await.unwrap();
    assert_eq!(sql(&ca_only).await, Ok(true));

    // A CA that did not sign the server certificate: refused by verify-ca, and by
    // require too once a root certificate is given (libpq's rule).
    for mode in ["verify-ca", "require"] {
        let cfg = scram(
            "127.0.0.1",
            &format!("sslmode={mode}&sslrootcert={other_ca}"),
        );
        let e = replication(&cfg).await.unwrap_err();
        assert!(
            e.contains("not signed by a CA in sslrootcert"),
            "{mode}: {e}"
        );
        let e = sql(&cfg).await.unwrap_err();
        assert!(
            e.contains("not signed by a CA in sslrootcert"),
            "{mode}: {e}"
        );
    }
    // require without a root certificate encrypts without checking.
    replication(&scram("127.0.0.1", "sslmode=require"))
        .await
        .unwrap();

    // Client certificate authentication (pg_hba `cert`): CN = user name.
    let cert_url = |extra: &str| {
        config(
            format!(
                "postgres://{CERT_USER}@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={ca}{extra}"
            ),
            None,
        )
    };
    let with_cert = cert_url(&format!(
        "&sslcert={}&sslkey={}",
        pki.path("client.pem").display(),
        pki.path("client.key").display()
    ));
    let client = replication(&with_cert).await.unwrap();
    assert_eq!(client.sasl_mechanism(), None, "cert auth, no SASL");
    assert_eq!(sql(&with_cert).await, Ok(true));
    let e = replication(&cert_url("")).await.unwrap_err();
    assert!(e.contains("28000"), "no client certificate: {e}");
    assert!(sql(&cert_url("")).await.is_err());
    // channel_binding=require refuses a server that authenticated without it.
    let e = replication(&config(
        format!("{}&channel_binding=require", with_cert.url),
        None,
    ))
    .await
    .unwrap_err();
    assert!(e.contains("without channel binding"), "{e}");

    // A missing CA file is a configuration problem, named before connecting.
    let e = replication(&scram(
        "127.0.0.1",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    ))
    .await
    .unwrap_err();
    assert!(e.contains("/nonexistent/ca.pem"), "{e}");
}

/// The older supported server too, on the path most deployments take:
/// verify-full + SCRAM-SHA-256-PLUS, and a plain connection refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_15_verify_full_with_channel_binding() {
    let pki = Pki::new();
    let pg = tls_cluster(PgVersion::V15, &pki).await;
    let url = format!(
        "postgres://{SCRAM_USER}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port(),
        pki.path("ca.pem").display()
    );
    let client = replication(&config(url.clone(), Some(PASSWORD)))
        .await
        .unwrap();
    assert!(client.is_tls());
    assert_eq!(client.sasl_mechanism(), Some("SCRAM-SHA-256-PLUS"));
    let bound = config(format!("{url}&channel_binding=require"), Some(PASSWORD));
    assert_eq!(sql(&bound).await, Ok(true));
    let plain = config(
        format!(
            "postgres://{SCRAM_USER}@127.0.0.1:{}/postgres?sslmode=disable",
            pg.port()
        ),
        Some(PASSWORD),
    );
    assert!(replication(&plain)
        .await
        .unwrap_err()
        .contains("no encryption"));
}

/// A server without TLS: prefer falls back to plain TCP, require refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_without_tls() {
    let pg = PgCluster::start(PgVersion::V17, &[]);
    let url = |mode: &str| {
        config(
            format!(
                "postgres://postgres@127.0.0.1:{}/postgres?sslmode={mode}",
                pg.port()
            ),
            None,
        )
    };
    let client = replication(&url("prefer")).await.unwrap();
    assert!(!client.is_tls());
    assert_eq!(sql(&url("prefer")).await, Ok(false));
    let e = replication(&url("require")).await.unwrap_err();
    assert!(e.contains("does not accept TLS"), "{e}");
    let e = sql(&url("require")).await.unwrap_err();
    assert!(e.contains("TLS"), "{e}");
    assert!(sql_tls_refusal(&url("require")).await);
}

// ---------------------------------------------------------------------------
// Kafka
// ---------------------------------------------------------------------------

/// The relay's own producer settings from typed security options, as `run` builds
/// them: every property `kafka.*` settings render, through the real config loader.
fn sink_settings(
    brokers: &str,
    flags: &[&str],
    env: &[(&str, &str)],
) -> outbox_relay::kafka::SinkSettings {
    let mut args = vec![
        "outbox-relay",
        "run",
        "--postgres-url",
        "postgres://relay@127.0.0.1/app",
        "--kafka-brokers",
        brokers,
    ];
    args.extend_from_slice(flags);
    let env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let cli = outbox_relay::cli::try_parse_with_env(args, &env).unwrap();
    let cfg = outbox_relay::cli::load_with_env(&cli, &env).unwrap();
    outbox_relay::kafka::SinkSettings {
        brokers: cfg.kafka.brokers.clone(),
        properties: cfg.kafka.properties.clone(),
        create_topics: true,
        topic_partitions: 1,
        topic_replication_factor: -1,
        max_in_flight_records: 1000,
    }
}

/// Creates a topic through the relay's sink (its admin client) and produces one
/// record with the relay's producer configuration; the topic, or the first error.
async fn produce_one(settings: &outbox_relay::kafka::SinkSettings) -> Result<String, String> {
    let topic = unique_name("tls_sasl");
    let sink = outbox_relay::kafka::KafkaSink::new(settings).map_err(|e| e.to_string())?;
    let prepared = tokio::time::timeout(Duration::from_secs(20), sink.prepare_topic(&topic))
        .await
        .map_err(|_| "topic creation timed out".to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    sink.close(Duration::from_secs(1)).await;
    prepared?;
    produce_to(settings, &topic).await?;
    Ok(topic)
}

async fn produce_to(
    settings: &outbox_relay::kafka::SinkSettings,
    topic: &str,
) -> Result<(), String> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = settings
        .client_config()
        .create()
        .map_err(|e| e.to_string())?;
    producer
        .send(
            FutureRecord::to(topic).key("k").payload("{}"),
            Duration::from_secs(20),
        )
        .await
        .map(|_| ())
        .map_err(|(e, _)| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sasl_scram_against_tansu() {
    let broker = SaslBroker::start(&[
        ("relay256", "pw-256", "scram256"),
        ("relay512", "pw-512", "scram512"),
    ]);
    let b = broker.bootstrap();
    let mut topic = String::new();
    for (user, mechanism, password) in [
        ("relay256", "SCRAM-SHA-256", "pw-256"),
        ("relay512", "scram-sha-512", "pw-512"),
    ] {
        let settings = sink_settings(
            &b,
            &[
                "--kafka-security-protocol",
                "SASL_PLAINTEXT",
                "--kafka-sasl-mechanism",
                mechanism,
                "--kafka-sasl-username",
                user,
            ],
            &[("OUTBOX_RELAY_KAFKA_SASL_PASSWORD", password)],
        );
        assert!(
            !format!("{settings:?}").contains(password),
            "Debug shows the password"
        );
        topic = produce_one(&settings)
            .await
            .unwrap_or_else(|e| panic!("{mechanism}: {e}\n--- tansu ---\n{}", broker.log()));
    }
    // A wrong password gets no record through.
    let dir = tempfile::tempdir().unwrap();
    let pw_file = dir.path().join("pw");
    std::fs::write(&pw_file, "wrong\n").unwrap();
    let pw_file = pw_file.display().to_string();
    let mut settings = sink_settings(
        &b,
        &[
            "--kafka-security-protocol",
            "sasl_plaintext",
            "--kafka-sasl-mechanism",
            "SCRAM-SHA-256",
            "--kafka-sasl-username",
            "relay256",
            "--kafka-sasl-password-file",
            &pw_file,
        ],
        &[],
    );
    assert_eq!(settings.properties["sasl.password"], "wrong");
    settings
        .properties
        .insert("message.timeout.ms".into(), "3000".into());
    let e = produce_to(&settings, &topic).await.unwrap_err();
    assert!(
        e.contains("Authentication") || e.contains("timed out"),
        "{e}"
    );
}

/// tansu cannot serve TLS (see the file comment), so this checks what can be: the
/// typed TLS settings reach librdkafka, which loads the CA file when the client is
/// created and refuses one that is not PEM.
#[test]
fn kafka_tls_settings_reach_librdkafka() {
    let pki = Pki::new();
    let ca = pki.path("ca.pem").display().to_string();
    let settings = sink_settings("127.0.0.1:9", &["--kafka-ssl-ca", &ca], &[]);
    assert_eq!(settings.properties["security.protocol"], "ssl");
    assert_eq!(settings.properties["ssl.ca.location"], ca);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    outbox_relay::kafka::KafkaSink::new(&settings).expect("librdkafka accepts the CA file");
    let not_pem = pki.path("not-a-ca.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let settings = sink_settings(
        "127.0.0.1:9",
        &["--kafka-ssl-ca", &not_pem.display().to_string()],
        &[],
    );
    let e = outbox_relay::kafka::KafkaSink::new(&settings)
        .err()
        .expect("librdkafka refuses a CA file that is not PEM")
        .to_string();
    assert!(e.contains("ssl.ca.location") || e.contains("CA"), "{e}");
}
