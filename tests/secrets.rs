//! Secrets stay secret: the relay binary runs end to end over PostgreSQL TLS
//! (verify-full, SCRAM-SHA-256-PLUS) and Kafka SASL/SCRAM with passwords from the
//! environment and from a file, with the most verbose logging, and neither password
//! may appear anywhere it writes: its whole log, `/metrics`, `/healthz`, `/readyz`,
//! the `status` and `check` output, nor the error messages of failed connections.

mod harness;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use harness::outbox::{insert_rows, DEADLINE, TABLE_SQL};
use harness::security::{tls_cluster, Pki, SaslBroker, SCRAM_USER};
use harness::{
    current_wal_lsn, free_port, lsn_to_u64, slot_confirmed_flush_lsn, unique_name, wait_until,
    PgVersion, RelayProcess,
};

const PG_SECRET: &str = "pg-Secr3t-4f2a9e";
const KAFKA_SECRET: &str = "kafka-Secr3t-7c1e0b";
const URL_SECRET: &str = "url-Secr3t-93d0aa";
const SECRETS: [&str; 3] = [PG_SECRET, KAFKA_SECRET, URL_SECRET];

fn assert_no_secret(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(
            !text.contains(secret),
            "{what} shows a password ({secret}):\n{text}"
        );
    }
}

/// Runs the relay binary to completion (a command other than `run`).
fn run_command(args: &[String], envs: &[(&str, &str)]) -> Output {
    let mut child = Command::new(RelayProcess::binary())
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "{args:?} did not finish"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A plain HTTP/1.1 GET; the whole response (status line, headers, body).
fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_reach_logs_metrics_or_status() {
    let pki = Pki::new();
    let pg = tls_cluster(PgVersion::V17, &pki).await;
    let admin = pg.socket_client().await;
    admin.batch_execute(TABLE_SQL).await.unwrap();
    let (slot, publication) = (unique_name("slot"), unique_name("pub"));
    admin
        .batch_execute(&format!(
            "ALTER ROLE {SCRAM_USER} PASSWORD '{PG_SECRET}';
             CREATE PUBLICATION {publication} FOR TABLE public.outbox_events WITH (publish = 'insert');
             GRANT USAGE ON SCHEMA public TO {SCRAM_USER};
             GRANT SELECT ON public.outbox_events TO {SCRAM_USER};"
        ))
        .await
        .unwrap();
    let broker = SaslBroker::start(&[("relay", KAFKA_SECRET, "scram256")]);
    let dir = tempfile::tempdir().unwrap();
    let kafka_pw_file = dir.path().join("kafka-password");
    std::fs::write(&kafka_pw_file, format!("{KAFKA_SECRET}\n")).unwrap();

    let url = format!(
        "postgres://{SCRAM_USER}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port(),
        pki.path("ca.pem").display()
    );
    let http_port = free_port();
    let common = |cmd: &str| -> Vec<String> {
        [
            cmd,
            "--postgres-url",
            &url,
            "--kafka-brokers",
            &broker.bootstrap(),
            "--kafka-security-protocol",
            "sasl_plaintext",
            "--kafka-sasl-mechanism",
            "SCRAM-SHA-256",
            "--kafka-sasl-username",
            "relay",
            "--slot",
            &slot,
            "--publication",
            &publication,
            "--no-create-publication",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let verbose = ("RUST_LOG", "debug,outbox_relay=trace");
    let env = [
        ("OUTBOX_RELAY_POSTGRES_PASSWORD", PG_SECRET),
        ("OUTBOX_RELAY_KAFKA_SASL_PASSWORD", KAFKA_SECRET),
        verbose,
    ];

    // `check` first: it connects over TLS with the password.
    let out = run_command(&common("check"), &env);
    assert_no_secret("check", &text(&out));

    // The relay streams over both secured connections, passwords from the
    // environment (PostgreSQL) and a file (Kafka).
    let mut args = common("run");
    args.extend([
        "--http-listen".to_string(),
        format!("127.0.0.1:{http_port}"),
        "--kafka-sasl-password-file".to_string(),
        kafka_pw_file.display().to_string(),
    ]);
    let mut relay = RelayProcess::spawn(
        &args,
        &[("OUTBOX_RELAY_POSTGRES_PASSWORD", PG_SECRET), verbose],
    );
    relay.wait_for_log("streaming", DEADLINE).await;
    let client = pg.socket_client().await;
    insert_rows(&client, 0, 5, 2).await;
    let end = lsn_to_u64(&current_wal_lsn(&client).await);
    wait_until(
        DEADLINE,
        "the slot confirms the rows (Kafka acknowledged them over SASL)",
        || async {
            slot_confirmed_flush_lsn(&client, &slot)
                .await
                .is_some_and(|l| lsn_to_u64(&l) >= end)
        },
    )
    .await;
    assert!(relay.is_running(), "{}", relay.log());

    for path in ["/metrics", "/healthz", "/readyz"] {
        let reply = http_get(http_port, path);
        assert!(reply.starts_with("HTTP/1.1"), "{path}: {reply}");
        assert_no_secret(path, &reply);
    }
    for extra in [&[][..], &["--json".to_string()][..]] {
        let mut args = common("status");
        args.extend(extra.iter().cloned());
        let out = run_command(&args, &env);
        assert_no_secret("status", &text(&out));
        assert!(!text(&out).trim().is_empty());
    }

    relay.sigterm();
    assert!(
        relay.wait_exit(Duration::from_secs(30)).await.is_some(),
        "relay did not stop"
    );
    let log = relay.log();
    assert!(log.contains("streaming"), "the log is the real one:\n{log}");
    assert_no_secret("the relay log", &log);

    // Failures quote neither the password that failed nor one in the URL.
    let wrong_pw = run_command(
        &common("check"),
        &[
            ("OUTBOX_RELAY_POSTGRES_PASSWORD", URL_SECRET),
            ("OUTBOX_RELAY_KAFKA_SASL_PASSWORD", KAFKA_SECRET),
            verbose,
        ],
    );
    assert!(!wrong_pw.status.success());
    assert!(
        text(&wrong_pw).contains("password authentication failed"),
        "{}",
        text(&wrong_pw)
    );
    assert_no_secret("a failed check", &text(&wrong_pw));

    let mut in_url = common("run");
    in_url[2] = url.replacen(
        &format!("{SCRAM_USER}@"),
        &format!("{SCRAM_USER}:{URL_SECRET}@"),
        1,
    );
    let mut relay = RelayProcess::spawn(
        &in_url,
        &[("OUTBOX_RELAY_KAFKA_SASL_PASSWORD", KAFKA_SECRET), verbose],
    );
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    assert!(
        status.is_some_and(|s| !s.success()),
        "a wrong password stops the relay: {status:?}\n{}",
        relay.log()
    );
    assert_no_secret(
        "the log of a relay with a wrong password in its URL",
        &relay.log(),
    );

    let mut bad_url = common("check");
    bad_url[2] = format!("postgres://{SCRAM_USER}:{URL_SECRET}@localhost:notaport/postgres");
    let out = run_command(&bad_url, &env);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert_no_secret("a configuration error", &text(&out));
}
