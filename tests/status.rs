//! `status::collect` and `status::sample_lag` against real PostgreSQL 15 and 17:
//! the collected fields agree with direct SQL, retained WAL grows with WAL
//! written, bookmark slots are found, and a missing slot exits 1.

mod harness;

use std::time::Duration;

use harness::{current_wal_lsn, lsn_to_u64, unique_name, PgCluster, PgVersion};
use outbox_relay::replication::{ConnectConfig, ReplicationClient};
use outbox_relay::status::{self, EXIT_OK, EXIT_RETAINING_TOO_MUCH, EXIT_SLOT_MISSING};
use outbox_relay::Lsn;

/// Writes roughly `bytes` of WAL (a table that is not published).
async fn write_wal(client: &tokio_postgres::Client, table: &str, bytes: usize) {
    let rows = bytes / 1000 + 1;
    client
        .execute(
            &format!("INSERT INTO {table} SELECT g, repeat('x', 1000) FROM generate_series(1, $1::int) g"),
            &[&(rows as i32)],
        )
        .await
        .expect("write WAL");
}

async fn check(version: PgVersion) {
    let pg = PgCluster::start(version, &[]);
    let client = pg.client().await;
    let slot = unique_name("status_slot");
    let publication = unique_name("status_pub");
    let filler = unique_name("filler");

    client
        .batch_execute(&format!(
            "CREATE TABLE outbox_events (id bigserial PRIMARY KEY, payload jsonb);
             CREATE TABLE {filler} (id int, pad text);
             CREATE PUBLICATION {publication} FOR TABLE outbox_events WITH (publish = 'insert');"
        ))
        .await
        .expect("create tables and publication");

    // Missing slot: exit code 1, no lag sample.
    let missing = status::collect(&client, &slot, &publication).await.unwrap();
    assert!(missing.slot.is_none());
    assert_eq!(status::exit_code(&missing, u64::MAX), EXIT_SLOT_MISSING);
    assert!(status::sample_lag(&client, &slot).await.unwrap().is_none());
    assert!(status::render_text(&missing).contains("MISSING"));

    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .expect("create slot");
    let bookmark = format!("{slot}_bookmark_nightly");
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&bookmark],
        )
        .await
        .expect("create bookmark slot");
    // A slot whose name merely contains ours is not a bookmark.
    let unrelated = format!("{slot}x");
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&unrelated],
        )
        .await
        .expect("create unrelated slot");

    write_wal(&client, &filler, 64 * 1024).await;
    client
        .execute("INSERT INTO outbox_events (payload) VALUES ('{}')", &[])
        .await
        .unwrap();

    let before_wal = lsn_to_u64(&current_wal_lsn(&client).await);
    let s1 = status::collect(&client, &slot, &publication).await.unwrap();
    let after_wal = lsn_to_u64(&current_wal_lsn(&client).await);

    // Server fields.
    let version_num: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(s1.server_version_num, version_num as u32);
    assert_eq!(s1.server_version_num / 10000, version.major());
    assert!(!s1.in_recovery);
    assert_eq!(s1.database, "postgres");
    let server_wal = s1.server_wal_lsn.expect("server WAL position").0;
    assert!(
        (before_wal..=after_wal).contains(&server_wal),
        "{before_wal} <= {server_wal} <= {after_wal}"
    );

    // Slot fields against direct SQL.
    let row = client
        .query_one(
            "SELECT plugin::text, slot_type, database::text, active, restart_lsn::text, \
             confirmed_flush_lsn::text, wal_status, safe_wal_size \
             FROM pg_replication_slots WHERE slot_name = $1::text",
            &[&slot],
        )
        .await
        .unwrap();
    let info = s1.slot.as_ref().expect("slot found");
    assert_eq!(info.plugin.as_deref(), row.get::<_, Option<&str>>(0));
    assert_eq!(info.plugin.as_deref(), Some("pgoutput"));
    assert_eq!(info.slot_type, row.get::<_, String>(1));
    assert_eq!(info.database.as_deref(), Some("postgres"));
    assert_eq!(info.active, row.get::<_, bool>(3));
    assert!(!info.active && info.holder.is_none());
    let restart: Lsn = row.get::<_, String>(4).parse().unwrap();
    let confirmed: Lsn = row.get::<_, String>(5).parse().unwrap();
    assert_eq!(info.restart_lsn, Some(restart));
    assert_eq!(info.confirmed_flush_lsn, Some(confirmed));
    assert_eq!(info.wal_status.as_deref(), row.get::<_, Option<&str>>(6));
    assert_eq!(info.wal_status.as_deref(), Some("reserved"));
    assert_eq!(info.safe_wal_size_bytes, row.get::<_, Option<i64>>(7));
    assert_eq!(
        info.safe_wal_size_bytes, None,
        "max_slot_wal_keep_size = -1"
    );
    assert!(!info.invalidated);
    if version == PgVersion::V17 {
        assert_eq!(info.conflicting, Some(false));
        assert_eq!(info.invalidation_reason, None);
    } else {
        assert_eq!(info.conflicting, None);
    }
    let retained = info.retained_wal_bytes.expect("retained bytes");
    assert_eq!(retained, server_wal - restart.0);
    assert!(
        retained >= 64 * 1024,
        "retained {retained} after writing 64 KiB"
    );
    assert_eq!(info.lag_bytes, Some(server_wal - confirmed.0));

    // Publication.
    assert!(s1.publication.exists);
    assert!(!s1.publication.all_tables);
    assert_eq!(s1.publication.publishes, vec!["insert".to_string()]);
    assert_eq!(
        s1.publication.tables,
        vec!["public.outbox_events".to_string()]
    );

    // Bookmarks: only `<slot>_bookmark_*`.
    assert_eq!(s1.bookmarks.len(), 1, "{:?}", s1.bookmarks);
    assert_eq!(s1.bookmarks[0].name, "nightly");
    assert_eq!(s1.bookmarks[0].slot_name, bookmark);
    assert!(s1.bookmarks[0].slot.retained_wal_bytes.unwrap() > 0);

    // Retained WAL grows with WAL written.
    write_wal(&client, &filler, 256 * 1024).await;
    let s2 = status::collect(&client, &slot, &publication).await.unwrap();
    let retained2 = s2.slot.as_ref().unwrap().retained_wal_bytes.unwrap();
    assert!(
        retained2 >= retained + 256 * 1024,
        "retained {retained} then {retained2} after writing 256 KiB more"
    );

    // Exit codes on the real thing.
    assert_eq!(status::exit_code(&s2, u64::MAX), EXIT_OK);
    assert_eq!(
        status::exit_code(&s2, retained2 - 1),
        EXIT_RETAINING_TOO_MUCH
    );

    // The lag sample agrees.
    let sample = status::sample_lag(&client, &slot)
        .await
        .unwrap()
        .expect("slot exists");
    assert!(sample.server_wal_lsn.0 >= s2.server_wal_lsn.unwrap().0);
    assert_eq!(sample.restart_lsn, Some(restart));
    assert_eq!(sample.confirmed_flush_lsn, Some(confirmed));
    assert_eq!(sample.retained_bytes, sample.server_wal_lsn.0 - restart.0);
    assert_eq!(sample.lag_bytes, sample.server_wal_lsn.0 - confirmed.0);
    assert!(sample.retained_bytes >= retained2);
    assert_eq!(sample.wal_status.as_deref(), Some("reserved"));
    assert!(!sample.active && sample.active_pid.is_none());

    // Renderings carry the data.
    let text = status::render_text(&s2);
    assert!(
        text.contains(&slot) && text.contains("pgoutput") && text.contains("nightly"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&status::render_json(&s2)).unwrap();
    assert_eq!(json["slot"]["restart_lsn"], restart.to_string());
    assert_eq!(json["bookmarks"][0]["name"], "nightly");

    // A missing publication is reported, not an error.
    let nopub = status::collect(&client, &slot, "no_such_publication")
        .await
        .unwrap();
    assert!(!nopub.publication.exists);

    // Dropped slot: exit code 1 again.
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .unwrap();
    let gone = status::collect(&client, &slot, &publication).await.unwrap();
    assert_eq!(status::exit_code(&gone, u64::MAX), EXIT_SLOT_MISSING);
    assert_eq!(gone.bookmarks.len(), 1, "the bookmark outlives the slot");
}

/// A slot held by a streaming replication connection: the holder's pid,
/// application and backend type are reported, and the lag sample agrees.
async fn check_holder(version: PgVersion) {
    let pg = PgCluster::start(version, &[]);
    let client = pg.client().await;
    let slot = unique_name("held");
    let publication = unique_name("held_pub");
    client
        .batch_execute(&format!(
            "CREATE TABLE outbox_events (id bigserial PRIMARY KEY, payload jsonb);
             CREATE PUBLICATION {publication} FOR TABLE outbox_events;"
        ))
        .await
        .unwrap();
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .unwrap();

    let repl = ReplicationClient::connect(&ConnectConfig {
        host: "127.0.0.1".into(),
        port: pg.port(),
        user: "postgres".into(),
        password: None,
        dbname: "postgres".into(),
        application_name: "status-test-holder".into(),
        connect_timeout: Duration::from_secs(10),
        max_frame_bytes: 16 << 20,
        tls: Default::default(),
    })
    .await
    .expect("replication connection");
    let options = [
        ("proto_version".to_string(), "1".to_string()),
        (
            "publication_names".to_string(),
            format!("\"{publication}\""),
        ),
    ];
    let stream = repl
        .start_logical_replication(&slot, Lsn::ZERO, &options)
        .await
        .expect("start streaming");
    let pid = stream.backend_pid();

    let s = status::collect(&client, &slot, &publication).await.unwrap();
    let info = s.slot.expect("slot exists");
    assert!(info.active);
    let holder = info.holder.expect("holder reported");
    assert_eq!(holder.pid, pid);
    assert_eq!(
        holder.application_name.as_deref(),
        Some("status-test-holder")
    );
    assert_eq!(holder.backend_type.as_deref(), Some("walsender"));
    assert_eq!(holder.user.as_deref(), Some("postgres"));
    let text = status::render_text(&status::collect(&client, &slot, &publication).await.unwrap());
    assert!(text.contains(&format!("pid {pid}")), "{text}");
    assert!(text.contains("status-test-holder"), "{text}");

    let sample = status::sample_lag(&client, &slot).await.unwrap().unwrap();
    assert!(sample.active);
    assert_eq!(sample.active_pid, Some(pid));

    stream
        .finish(Duration::from_secs(5))
        .await
        .expect("stop streaming");
}

#[tokio::test]
async fn status_on_postgres_15() {
    check(PgVersion::V15).await;
}

#[tokio::test]
async fn status_on_postgres_17() {
    check(PgVersion::V17).await;
}

#[tokio::test]
async fn holder_on_postgres_15() {
    check_holder(PgVersion::V15).await;
}

#[tokio::test]
async fn holder_on_postgres_17() {
    check_holder(PgVersion::V17).await;
}

/// Runs the release binary with `args` and extra `envs`; returns the exit code and stderr.
fn exit_of(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = std::process::Command::new(harness::RelayProcess::binary())
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("run the relay binary");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A bad flag, an unknown variable or an unusable URL exits 64 in every command,
/// never with a code `status` gives a slot state (0-5), so a script acting on
/// "invalidated" (2) never acts on a typo. No server is needed: these fail first.
#[test]
fn configuration_errors_exit_64_in_every_command() {
    const URL: &str = "postgres://u@127.0.0.1:1/db";
    for (args, envs) in [
        (vec!["status", "--no-such-flag"], vec![]),
        (
            vec!["status", "--postgres-url", URL],
            vec![("OUTBOX_RELAY_SLOTT", "x")],
        ),
        (
            vec![
                "status",
                "--postgres-url",
                "postgres://u@localhost:notaport/db",
            ],
            vec![],
        ),
        (vec!["status", "--max-retained-bytes", "lots"], vec![]),
        (
            vec!["check", "--postgres-url", URL, "--kafka-brokers"],
            vec![],
        ),
        (
            vec!["run", "--postgres-url", URL, "--kafka-brokers", "k:9092"],
            vec![("OUTBOX_RELAY_KAFKA_BROKER", "k:9092")],
        ),
        (
            vec![
                "bookmark",
                "list",
                "--postgres-url",
                "postgres://u@localhost:notaport/db",
            ],
            vec![],
        ),
        (
            vec!["replay", "--postgres-url", URL, "--kafka-brokers", "k:9092"],
            vec![],
        ),
        (vec!["peek", "--limit", "-1"], vec![]),
        (vec!["no-such-command"], vec![]),
    ] {
        let (code, stderr) = exit_of(&args, &envs);
        assert_eq!(code, Some(64), "{args:?} {envs:?}: {stderr}");
    }
    // Help and version are not errors.
    assert_eq!(exit_of(&["status", "--help"], &[]).0, Some(0));
    assert_eq!(exit_of(&["--version"], &[]).0, Some(0));
    // A server that cannot be read is still 4.
    let (code, stderr) = exit_of(&["status", "--postgres-url", URL], &[]);
    assert_eq!(code, Some(4), "{stderr}");
}
