//! Preflight checks and publication setup (`setup`) against real PostgreSQL clusters,
//! and the `sql/` files they recommend.

mod harness;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use harness::{pg_versions, unique_name, wait_until, PgCluster, PgVersion};
use outbox_relay::config::{quote_ident, Config, KafkaConfig, PostgresConfig, Severity};
use outbox_relay::setup::{self, Problem, SetupError};

fn sql_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The ```sql block of sql/README.md that contains `needle`.
fn readme_sql_block(needle: &str) -> String {
    let readme = sql_file("README.md");
    readme
        .split("```sql")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .find(|block| block.contains(needle))
        .unwrap_or_else(|| panic!("no sql block with {needle:?} in sql/README.md"))
        .to_string()
}

/// The defaults (table public.outbox_events), with names unique to this test.
fn config(cluster: &PgCluster) -> Config {
    Config {
        postgres: PostgresConfig {
            url: cluster.url(),
            slot: unique_name("slot"),
            publication: unique_name("pub"),
            ..Default::default()
        },
        kafka: KafkaConfig {
            brokers: "127.0.0.1:9".into(),
            ..Default::default()
        },
        ..Default::default()
    }
}

async fn connect_as(cluster: &PgCluster, user: &str) -> tokio_postgres::Client {
    let url = format!("postgres://{user}@127.0.0.1:{}/postgres", cluster.port());
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect as {user}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

fn errors(problems: &[Problem]) -> Vec<String> {
    problems
        .iter()
        .filter(|p| p.is_error())
        .map(|p| p.to_string())
        .collect()
}

fn notes(problems: &[Problem]) -> Vec<String> {
    problems
        .iter()
        .filter(|p| p.severity == Severity::Info)
        .map(|p| p.to_string())
        .collect()
}

/// Everything `check` would report (errors and notes), checking on the way that
/// `preflight` returns exactly the errors.
async fn preflight(cfg: &Config, client: &tokio_postgres::Client) -> Vec<Problem> {
    let all = setup::diagnose(cfg, client)
        .await
        .expect("diagnose queries");
    let blocking = setup::preflight(cfg, client)
        .await
        .expect("preflight queries");
    let errors: Vec<Problem> = all.iter().filter(|p| p.is_error()).cloned().collect();
    assert_eq!(blocking, errors);
    // Most tests connect as the superuser `postgres`, which `check` notes as more
    // privilege than needed (see setup::checks); these tests are about the rest.
    // The harness leaves max_slot_wal_keep_size at its default, -1, which
    // `check` notes (tested in wal_senders_and_wal_keep_as_a_least_privileged_role).
    all.into_iter()
        .filter(|p| !p.what.contains("is a superuser"))
        .filter(|p| !p.what.starts_with("max_slot_wal_keep_size is -1"))
        .collect()
}

async fn create_slot(client: &tokio_postgres::Client, slot: &str, plugin: &str) {
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, $2)",
            &[&slot, &plugin],
        )
        .await
        .unwrap_or_else(|e| panic!("create slot {slot}: {}", setup::describe_pg_error(&e)));
}

/// Inserts streamed by pgoutput through `cfg`'s slot and publication so far (peeked,
/// so the slot does not move).
async fn streamed_inserts(client: &tokio_postgres::Client, cfg: &Config) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL,
                 'proto_version', '1', 'publication_names', $2)
             WHERE get_byte(data, 0) = ascii('I')",
            &[
                &cfg.postgres.slot,
                &quote_ident(&cfg.postgres.publication).into_owned(),
            ],
        )
        .await
        .unwrap_or_else(|e| panic!("peek changes: {}", setup::describe_pg_error(&e)))
        .get(0)
}

#[tokio::test]
async fn a_good_setup_has_no_problems_on_every_version() {
    for version in pg_versions() {
        let cluster = PgCluster::start(version, &[]);
        let client = cluster.client().await;
        client
            .batch_execute(&sql_file("01_outbox_table.sql"))
            .await
            .unwrap();
        let cfg = config(&cluster);

        // Fresh: slot and publication missing but creatable; only notes.
        let before = preflight(&cfg, &client).await;
        assert!(errors(&before).is_empty(), "PG{version}: {before:#?}");
        let notes = notes(&before);
        assert_eq!(notes.len(), 2, "PG{version}: {notes:#?}");
        assert!(notes[0].contains("publication") && notes[0].contains("does not exist yet"));
        assert!(notes[1].contains("replication slot") && notes[1].contains("does not exist yet"));

        setup::ensure_publication(&cfg, &client).await.unwrap();
        create_slot(&client, &cfg.postgres.slot, "pgoutput").await;
        let after = preflight(&cfg, &client).await;
        assert_eq!(after, [], "PG{version}");

        let slot = setup::slot_state(&cfg, &client)
            .await
            .unwrap()
            .expect("slot exists");
        assert_eq!(
            (slot.plugin.as_str(), slot.database.as_str()),
            ("pgoutput", "postgres"),
            "PG{version}"
        );
        assert!(!slot.invalidated && slot.active_pid.is_none() && !slot.temporary);
        assert!(slot.confirmed_flush_lsn.is_some() && slot.restart_lsn.is_some());
        assert_eq!(slot.wal_status.as_deref(), Some("reserved"));
    }
}

#[tokio::test]
async fn wal_level_replica_is_reported_with_its_fix() {
    let cluster = PgCluster::start_with_wal_level_replica(PgVersion::V15);
    let client = cluster.client().await;
    client
        .batch_execute(&sql_file("01_outbox_table.sql"))
        .await
        .unwrap();
    let problems = preflight(&config(&cluster), &client).await;
    assert_eq!(
        errors(&problems),
        ["wal_level is 'replica' — fix: set wal_level = logical in postgresql.conf and restart PostgreSQL"]
    );
}

#[tokio::test]
async fn a_missing_column_is_named_with_the_table_columns() {
    let cluster = PgCluster::start(PgVersion::V15, &[]);
    let client = cluster.client().await;
    client
        .batch_execute(
            "CREATE TABLE public.outbox_events (
                 id uuid PRIMARY KEY, aggregatetype text, AggregateId text, event_type text, body jsonb)",
        )
        .await
        .unwrap();
    let problems = preflight(&config(&cluster), &client).await;
    let errors = errors(&problems);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let e = &errors[0];
    assert!(
        e.starts_with(
            "table public.outbox_events has no column payload, type \
             (its columns: id, aggregatetype, aggregateid, event_type, body)"
        ),
        "{e}"
    );
    assert!(
        e.contains("payload_column / --payload-column")
            && e.contains("type_column / --type-column"),
        "{e}"
    );

    // Mapped to the table's own names, it passes.
    let mut cfg = config(&cluster);
    cfg.mapping.payload_column = "body".into();
    cfg.mapping.type_column = Some("event_type".into());
    assert!(errors_of(&cfg, &client).await.is_empty());

    // Case matters; the near miss is pointed out.
    cfg.mapping.key_column = "AggregateId".into();
    let errors = errors_of(&cfg, &client).await;
    assert!(
        errors[0].contains("no column AggregateId")
            && errors[0].contains("did you mean \"aggregateid\""),
        "{errors:?}"
    );
}

async fn errors_of(cfg: &Config, client: &tokio_postgres::Client) -> Vec<String> {
    errors(&preflight(cfg, client).await)
}

#[tokio::test]
async fn a_missing_table_is_reported_with_look_alikes() {
    let cluster = PgCluster::start(PgVersion::V15, &[]);
    let client = cluster.client().await;
    client
        .batch_execute("CREATE TABLE public.outbox (id int)")
        .await
        .unwrap();
    let errors = errors_of(&config(&cluster), &client).await;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].contains("table public.outbox_events does not exist")
            && errors[0].contains("public.outbox")
    );
}

#[tokio::test]
async fn a_missing_publication_is_reported_when_creating_it_is_disabled() {
    let cluster = PgCluster::start(PgVersion::V15, &[]);
    let client = cluster.client().await;
    client
        .batch_execute(&sql_file("01_outbox_table.sql"))
        .await
        .unwrap();
    let mut cfg = config(&cluster);
    cfg.postgres.create_publication = false;
    let errors = errors_of(&cfg, &client).await;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].contains(&format!(
        "publication {} does not exist, and creating it is disabled",
        cfg.postgres.publication
    )));
    assert!(errors[0].contains("sql/02_publication.sql"));
    let err = setup::ensure_publication(&cfg, &client).await.unwrap_err();
    assert!(
        matches!(err, SetupError::PublicationMissing { .. }),
        "{err}"
    );

    cfg.postgres.create_slot = false;
    let errors = errors_of(&cfg, &client).await;
    assert!(
        errors[1].contains("replication slot")
            && errors[1].contains("pg_create_logical_replication_slot"),
        "{errors:#?}"
    );
}

#[tokio::test]
async fn a_role_without_replication_is_reported() {
    let cluster = PgCluster::start(PgVersion::V15, &[]);
    let admin = cluster.client().await;
    admin
        .batch_execute(&sql_file("01_outbox_table.sql"))
        .await
        .unwrap();
    admin
        .batch_execute("CREATE ROLE app_reader LOGIN")
        .await
        .unwrap();
    let mut cfg = config(&cluster);
    cfg.postgres.create_publication = false;
    admin
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE public.outbox_events WITH (publish = 'insert')",
            quote_ident(&cfg.postgres.publication)
        ))
        .await
        .unwrap();

    let client = connect_as(&cluster, "app_reader").await;
    let errors = errors_of(&cfg, &client).await;
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors[0].contains("role app_reader may not start replication")
            && errors[0].contains("ALTER ROLE app_reader REPLICATION")
    );
    assert!(
        errors[1].contains("role app_reader cannot read public.outbox_events")
            && errors[1].contains("GRANT SELECT")
    );
}

#[tokio::test]
async fn the_least_privilege_role_of_the_sql_files_passes() {
    let cluster = PgCluster::start(PgVersion::V15, &[]);
    let admin = cluster.client().await;
    for file in [
        "01_outbox_table.sql",
        "02_publication.sql",
        "03_relay_role.sql",
    ] {
        admin
            .batch_execute(&sql_file(file))
            .await
            .unwrap_or_else(|e| panic!("{file}: {}", setup::describe_pg_error(&e)));
    }
    let relay = connect_as(&cluster, "outbox_relay").await;
    let mut cfg = config(&cluster);
    cfg.postgres.publication = "outbox_relay".into();
    let problems = preflight(&cfg, &relay).await;
    assert!(errors(&problems).is_empty(), "{problems:#?}");
    assert!(
        !notes(&problems)
            .iter()
            .any(|n| n.contains("does not need") || n.contains("only reads")),
        "the least-privilege role has nothing to spare: {problems:#?}"
    );
    setup::ensure_publication(&cfg, &relay).await.unwrap();

    // Without the publication, this role could not create it: said before run fails.
    cfg.postgres.publication = unique_name("pub");
    let errors = errors_of(&cfg, &relay).await;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].contains("cannot create it") && errors[0].contains("sql/02_publication.sql"),
        "{errors:?}"
    );
    let err = setup::ensure_publication(&cfg, &relay).await.unwrap_err();
    assert!(matches!(err, SetupError::CreatePublication { .. }), "{err}");
    assert!(!err.is_transient(), "a missing privilege needs an operator");
    assert!(
        err.to_string()
            .contains("permission denied for database postgres"),
        "{err}"
    );
}

#[tokio::test]
async fn ensure_publication_creates_a_working_publication() {
    let cluster = PgCluster::start(PgVersion::V15, &[]);
    let client = cluster.client().await;
    client
        .batch_execute(&sql_file("01_outbox_table.sql"))
        .await
        .unwrap();
    client
        .batch_execute("CREATE TABLE public.other (id int)")
        .await
        .unwrap();
    let cfg = config(&cluster);

    setup::ensure_publication(&cfg, &client).await.unwrap();
    setup::ensure_publication(&cfg, &client)
        .await
        .expect("idempotent");
    let row = client
        .query_one(
            "SELECT pubinsert, pubupdate, pubdelete, pubtruncate, puballtables,
                    (SELECT array_agg(format('%I.%I', schemaname, tablename)) FROM pg_publication_tables WHERE pubname = $1)
             FROM pg_publication WHERE pubname = $1",
            &[&cfg.postgres.publication],
        )
        .await
        .unwrap();
    let flags: (bool, bool, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(flags, (true, false, false, false, false));
    assert_eq!(row.get::<_, Vec<String>>(5), ["public.outbox_events"]);

    // It streams inserts of the outbox table, and nothing else.
    create_slot(&client, &cfg.postgres.slot, "pgoutput").await;
    client
        .batch_execute(
            "INSERT INTO public.outbox_events (aggregatetype, aggregateid, type, payload)
                 VALUES ('order', '1', 'Created', '{}');
             INSERT INTO public.other VALUES (1);
             UPDATE public.outbox_events SET type = 'x';
             DELETE FROM public.outbox_events;",
        )
        .await
        .unwrap();
    assert_eq!(streamed_inserts(&client, &cfg).await, 1);

    // Rows deleted right after insert, with the trigger of sql/README.md, still are.
    client
        .batch_execute(&readme_sql_block("AFTER INSERT"))
        .await
        .unwrap();
    client
        .batch_execute(
            "INSERT INTO public.outbox_events (aggregatetype, aggregateid, type, payload)
                 VALUES ('order', '2', 'Created', '{}'), ('order', '3', 'Created', '{}');",
        )
        .await
        .unwrap();
    let left: i64 = client
        .query_one("SELECT count(*) FROM public.outbox_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    assert_eq!(streamed_inserts(&client, &cfg).await, 3);

    // Someone else's publication without the table is an error, and left alone.
    let mut other = cfg.clone();
    other.postgres.publication = unique_name("theirs");
    client
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE public.other",
            other.postgres.publication
        ))
        .await
        .unwrap();
    let err = setup::ensure_publication(&other, &client)
        .await
        .unwrap_err();
    assert!(
        matches!(err, SetupError::PublicationLacksTable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("ALTER PUBLICATION"), "{err}");
    let problems = preflight(&other, &client).await;
    let errors = errors(&problems);
    assert_eq!(errors.len(), 1, "{problems:#?}");
    assert!(errors[0].contains("does not include public.outbox_events"));
    let notes = notes(&problems);
    assert!(
        notes
            .iter()
            .any(|n| n.contains("also publishes 1 other table(s): public.other")),
        "{notes:#?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains("also publishes update, delete, truncate")),
        "{notes:#?}"
    );
}

#[tokio::test]
async fn a_partitioned_outbox_is_published_via_its_root() {
    let cluster = PgCluster::start(PgVersion::V15, &[]);
    let client = cluster.client().await;
    client
        .batch_execute(
            "CREATE TABLE public.outbox_events (id uuid DEFAULT gen_random_uuid(), aggregatetype text,
                 aggregateid text, type text, payload jsonb, created_at timestamptz DEFAULT now())
                 PARTITION BY RANGE (created_at);
             CREATE TABLE public.outbox_events_all PARTITION OF public.outbox_events DEFAULT;",
        )
        .await
        .unwrap();
    let cfg = config(&cluster);
    setup::ensure_publication(&cfg, &client).await.unwrap();
    create_slot(&client, &cfg.postgres.slot, "pgoutput").await;
    let problems = preflight(&cfg, &client).await;
    assert_eq!(errors(&problems), Vec::<String>::new());
    // check says how the partitions are published.
    assert_eq!(notes(&problems).len(), 1, "{problems:#?}");
    assert!(notes(&problems)[0].contains("publishes via the partition root"));
    client
        .batch_execute("INSERT INTO public.outbox_events (aggregatetype, aggregateid, type, payload) VALUES ('a', '1', 't', '{}')")
        .await
        .unwrap();
    assert_eq!(streamed_inserts(&client, &cfg).await, 1);
}

/// `pg_recvlogical` streaming from a slot: a real walsender holding it.
struct SlotHolder(Child);

impl SlotHolder {
    fn start(cluster: &PgCluster, cfg: &Config, application_name: &str) -> SlotHolder {
        let conninfo = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres application_name={application_name}",
            cluster.port()
        );
        let child = Command::new(cluster.bindir().join("pg_recvlogical"))
            .args([
                "-d",
                &conninfo,
                "--slot",
                &cfg.postgres.slot,
                "--start",
                "-f",
                "/dev/null",
            ])
            .args(["-o", "proto_version=1", "-o"])
            .arg(format!("publication_names={}", cfg.postgres.publication))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn pg_recvlogical");
        SlotHolder(child)
    }
}

impl Drop for SlotHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn slot_holders_and_foreign_slots_are_reported_on_every_version() {
    for version in pg_versions() {
        let cluster = PgCluster::start(version, &[]);
        let client = cluster.client().await;
        client
            .batch_execute(&sql_file("01_outbox_table.sql"))
            .await
            .unwrap();
        let cfg = config(&cluster);
        setup::ensure_publication(&cfg, &client).await.unwrap();
        create_slot(&client, &cfg.postgres.slot, "pgoutput").await;

        for (app, hint) in [
            ("outbox-relay", "another outbox-relay"),
            ("someone-else", "stop that client"),
        ] {
            let _holder = SlotHolder::start(&cluster, &cfg, app);
            wait_until(
                Duration::from_secs(20),
                "pg_recvlogical holds the slot",
                || async {
                    setup::slot_state(&cfg, &client)
                        .await
                        .unwrap()
                        .and_then(|s| s.active_pid)
                        .is_some()
                },
            )
            .await;
            let state = setup::slot_state(&cfg, &client).await.unwrap().unwrap();
            assert_eq!(
                state.holder_application_name.as_deref(),
                Some(app),
                "PG{version}"
            );
            let problems = preflight(&cfg, &client).await;
            assert!(errors(&problems).is_empty(), "PG{version}: {problems:#?}");
            let notes = notes(&problems);
            let pid = state.active_pid.unwrap();
            assert_eq!(notes.len(), 1, "PG{version}: {notes:#?}");
            assert!(
                notes[0].contains(&format!(
                    "is in use by process {pid} (application_name \"{app}\")"
                )),
                "{notes:?}"
            );
            assert!(
                notes[0].contains(hint)
                    && notes[0].contains(&format!("pg_terminate_backend({pid})")),
                "{notes:?}"
            );
            drop(_holder);
            wait_until(Duration::from_secs(20), "the slot is released", || async {
                setup::slot_state(&cfg, &client)
                    .await
                    .unwrap()
                    .and_then(|s| s.active_pid)
                    .is_none()
            })
            .await;
        }

        let mut other = cfg.clone();
        other.postgres.slot = unique_name("decoding");
        create_slot(&client, &other.postgres.slot, "test_decoding").await;
        let errors = errors_of(&other, &client).await;
        assert_eq!(errors.len(), 1, "PG{version}: {errors:#?}");
        assert!(
            errors[0].contains("uses output plugin \"test_decoding\", not pgoutput"),
            "{errors:?}"
        );
    }
}

#[tokio::test]
async fn an_invalidated_slot_is_reported_on_every_version() {
    for version in pg_versions() {
        let cluster = PgCluster::start(
            version,
            &[("max_slot_wal_keep_size", "1MB"), ("wal_keep_size", "0")],
        );
        let client = cluster.client().await;
        client
            .batch_execute(&sql_file("01_outbox_table.sql"))
            .await
            .unwrap();
        let cfg = config(&cluster);
        setup::ensure_publication(&cfg, &client).await.unwrap();
        create_slot(&client, &cfg.postgres.slot, "pgoutput").await;
        wait_until(
            Duration::from_secs(30),
            "the slot loses its WAL",
            || async {
                client
                    .batch_execute(
                        "CREATE TABLE IF NOT EXISTS filler AS SELECT 1 AS x;
                     INSERT INTO filler SELECT g FROM generate_series(1, 20000) g;
                     SELECT pg_switch_wal(); CHECKPOINT;",
                    )
                    .await
                    .unwrap();
                setup::slot_state(&cfg, &client)
                    .await
                    .unwrap()
                    .is_some_and(|s| s.invalidated)
            },
        )
        .await;
        let state = setup::slot_state(&cfg, &client).await.unwrap().unwrap();
        assert_eq!(state.wal_status.as_deref(), Some("lost"), "PG{version}");
        if version == PgVersion::V17 {
            assert_eq!(state.invalidation_reason.as_deref(), Some("wal_removed"));
        }
        let errors = errors_of(&cfg, &client).await;
        assert_eq!(errors.len(), 1, "PG{version}: {errors:#?}");
        assert!(
            errors[0].contains("is invalidated") && errors[0].contains("pg_drop_replication_slot"),
            "{errors:?}"
        );
    }
}

#[tokio::test]
async fn quote_ident_agrees_with_postgres() {
    let cluster = PgCluster::start(PgVersion::V15, &[]);
    let client = cluster.client().await;
    let mut words: Vec<String> = client
        .query("SELECT word FROM pg_get_keywords()", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    words.extend(
        [
            "outbox_events",
            "Outbox",
            "a b",
            "a\"b",
            "_x",
            "x$",
            "9lives",
            "ünï",
            "",
        ]
        .map(String::from),
    );
    for word in words {
        let theirs: String = client
            .query_one("SELECT quote_ident($1)", &[&word])
            .await
            .unwrap()
            .get(0);
        assert_eq!(quote_ident(&word), theirs, "{word:?}");
    }
}

#[tokio::test]
async fn a_lost_connection_is_transient() {
    let mut cluster = PgCluster::start(PgVersion::V15, &[]);
    let client = cluster.client().await;
    client
        .batch_execute(&sql_file("01_outbox_table.sql"))
        .await
        .unwrap();
    let cfg = config(&cluster);
    cluster.stop();
    let err = setup::ensure_publication(&cfg, &client).await.unwrap_err();
    assert!(matches!(err, SetupError::Postgres(_)), "{err}");
    assert!(err.is_transient(), "{err}");
}

/// WAL-sender headroom as the least-privileged role sees it: other roles'
/// walsenders have a NULL `backend_type` in its `pg_stat_activity`, so only
/// `pg_stat_get_wal_senders()` counts them. And an unlimited
/// `max_slot_wal_keep_size` is noted.
#[tokio::test]
async fn wal_senders_and_wal_keep_as_a_least_privileged_role() {
    let cluster = PgCluster::start(PgVersion::V17, &[("max_wal_senders", "2")]);
    let admin = cluster.client().await;
    for file in [
        "01_outbox_table.sql",
        "02_publication.sql",
        "03_relay_role.sql",
    ] {
        admin.batch_execute(&sql_file(file)).await.unwrap();
    }
    let relay = connect_as(&cluster, "outbox_relay").await;
    let mut cfg = config(&cluster);
    cfg.postgres.publication = "outbox_relay".into();
    let all = setup::diagnose(&cfg, &relay).await.unwrap();
    assert!(
        all.iter()
            .any(|p| !p.is_error() && p.what.starts_with("max_slot_wal_keep_size is -1")),
        "{all:#?}"
    );
    assert!(errors(&all).is_empty(), "{all:#?}");

    // Two replication connections of another role take both WAL senders.
    let mut held = Vec::new();
    for i in 0..2 {
        let repl = outbox_relay::replication::ReplicationClient::connect(
            &outbox_relay::replication::ConnectConfig {
                host: "127.0.0.1".into(),
                port: cluster.port(),
                user: "postgres".into(),
                password: None,
                dbname: "postgres".into(),
                application_name: format!("physical-{i}"),
                connect_timeout: Duration::from_secs(10),
                max_frame_bytes: 16 << 20,
                tls: Default::default(),
            },
        )
        .await
        .expect("replication connection");
        held.push(repl);
    }
    let all = setup::diagnose(&cfg, &relay).await.unwrap();
    assert!(
        notes(&all).iter().any(|e| e.contains("all 2 WAL senders")),
        "{all:#?}"
    );
    drop(held);
}

/// `check` contacts Kafka: an unreachable broker is an error; a fixed topic
/// must exist (creation off) or be creatable (asked validate-only, nothing is
/// created); template topics cannot be listed and are said to be so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_contacts_kafka_and_judges_the_topics() {
    let broker = harness::Broker::start_memory();
    broker.warm_up().await;
    let mut cfg = Config::default();
    cfg.kafka.brokers = broker.bootstrap();
    let fixed = unique_name("fixed");
    cfg.mapping.topic = Some(fixed.clone());

    cfg.kafka.create_topics = false;
    let p = setup::diagnose_kafka(&cfg).await;
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(
        p[0].is_error() && p[0].what.contains(&fixed) && p[0].what.contains("does not exist"),
        "{p:#?}"
    );

    broker.create_topic(&fixed, 1).await;
    cfg.kafka.create_topics = false;
    assert_eq!(setup::diagnose_kafka(&cfg).await, []);

    // A missing topic Kafka may create is fine (a validate-only request; tansu
    // ignores the flag and creates it, which the relay would do anyway).
    cfg.kafka.create_topics = true;
    cfg.relay.dead_letter_topic = Some(unique_name("dlq"));
    assert_eq!(setup::diagnose_kafka(&cfg).await, []);
    cfg.relay.dead_letter_topic = None;
    cfg.kafka.create_topics = false;

    // Topics named by the rows cannot be listed ahead.
    cfg.mapping.topic = None;
    let p = setup::diagnose_kafka(&cfg).await;
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(
        !p[0].is_error() && p[0].what.contains("cannot list them"),
        "{p:#?}"
    );

    // Nobody listening.
    cfg.kafka.brokers = "127.0.0.1:9".into();
    let p = setup::diagnose_kafka(&cfg).await;
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(
        p[0].is_error() && p[0].what.contains("cannot reach Kafka at 127.0.0.1:9"),
        "{p:#?}"
    );
}
