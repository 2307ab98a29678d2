//! PostgreSQL failover: a primary and a streaming standby (pg_basebackup,
//! physical slot), the relay on a two-host URL with
//! `target_session_attrs=read-write`, events before, during (relay paused)
//! and after a crash of the primary (`-m immediate`) and `pg_ctl promote`.
//!
//! * PostgreSQL 17, failover slot: every committed event reaches Kafka, per
//!   key in commit order, and the relay resumes from the synced slot on the
//!   promoted server (it never creates one there).
//! * PostgreSQL 15 (no slot synchronisation): the relay stops with the gap
//!   error (position, commit time, backfill command) and streams nothing past
//!   it, even when someone re-created the slot on the promoted server.
//! * `check` and `status` name what makes a cluster not failover-ready.
//!
//! Commits on the primary are synchronous to the standby
//! (`synchronous_standby_names`): an event whose commit returned is on the
//! standby when the primary crashes, so "every committed event" is every
//! event the test wrote (asserted against the promoted server's table).

mod harness;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use harness::outbox::{insert_rows, Env, Expected};
use harness::standby::{promote, start_standby, synced_slot, two_host_url, StandbySetup};
use harness::{
    create_logical_slot, current_wal_lsn, lsn_to_u64, set_and_reload, slot_confirmed_flush_lsn,
    wait_until, PgCluster, PgVersion, RelayProcess, ShutdownMode,
};

/// Generous: slot synchronisation naps up to 30 s, and the machine is shared.
const LONG: Duration = Duration::from_secs(180);

fn args(env: &Env, url: &str, command: &str) -> Vec<String> {
    [
        command,
        "--postgres-url",
        url,
        "--kafka-brokers",
        &env.broker.bootstrap(),
        "--slot",
        &env.slot,
        "--publication",
        &env.publication,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn spawn_relay(env: &Env, url: &str) -> RelayProcess {
    RelayProcess::spawn(
        &args(env, url, "run"),
        &[("RUST_LOG", "info,outbox_relay=debug")],
    )
}

/// Runs a one-shot command (`check`, `status --json`); exit code and stdout.
fn run_command(env: &Env, url: &str, command: &str, extra: &[&str]) -> (i32, String) {
    let out = Command::new(RelayProcess::binary())
        .args(args(env, url, command))
        .args(extra)
        .output()
        .expect("run outbox-relay");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (
        out.status.code().unwrap_or(-1),
        format!("{stdout}\n--- stderr ---\n{stderr}"),
    )
}

fn status_json(env: &Env, url: &str) -> serde_json::Value {
    let out = Command::new(RelayProcess::binary())
        .args(args(env, url, "status"))
        .arg("--json")
        .output()
        .expect("run outbox-relay status");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json is not JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn signal(relay: &RelayProcess, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of our own child, not reaped yet.
    let rc = unsafe { libc::kill(relay.pid() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({}, {sig})", relay.pid());
}

/// Writes WAL outside the publication, so the slot's confirmed position moves
/// (the relay confirms keepalive positions) without a single event.
async fn nudge(client: &tokio_postgres::Client) {
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS nudge (i int); INSERT INTO nudge VALUES (1)")
        .await
        .expect("nudge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg17_relay_resumes_from_the_synced_failover_slot_after_a_primary_crash_and_promotion() {
    let mut env = Env::with_pg(PgCluster::start(PgVersion::V17, &[])).await;
    let standby = start_standby(&env.pg, "standby1", StandbySetup::default()).await;
    let url = two_host_url(&env.pg, &standby, "read-write");
    let primary = env.client().await;
    let standby_client = standby.client().await;

    // The relay reaches the primary through the two-host URL and creates a
    // failover slot there.
    let mut relay = spawn_relay(&env, &url);
    env.wait_streaming(&mut relay).await;
    let (_, _, failover, _) = synced_slot(&primary, &env.slot)
        .await
        .expect("the relay created its slot on the primary");
    assert!(
        failover,
        "a PostgreSQL 17 slot is a failover slot by default"
    );

    // Before: events delivered while the primary lives.
    let mut seq = insert_rows(&primary, 0, 15, 3).await;

    // The standby holds a persistent synced copy once the primary's slot has
    // moved past the standby's position.
    wait_until(
        LONG,
        "the standby holds a persistent synced copy of the slot",
        || {
            let (primary, standby_client, slot) = (&primary, &standby_client, &env.slot);
            async move {
                nudge(primary).await;
                matches!(
                    synced_slot(standby_client, slot).await,
                    Some((true, false, true, _))
                )
            }
        },
    )
    .await;
    let status = status_json(&env, &url);
    assert_eq!(
        status["failover"]["ready"], true,
        "status says the cluster is failover-ready: {status:#}"
    );

    // During: the relay is paused; these events are committed (synchronously
    // on the standby) but not delivered when the primary crashes.
    signal(&relay, libc::SIGSTOP);
    seq = insert_rows(&primary, seq, 15, 3).await;
    drop(primary);
    env.pg.stop_with(ShutdownMode::Immediate);
    promote(&standby).await;
    signal(&relay, libc::SIGCONT);

    // After: events on the promoted server.
    let new_primary = standby.client().await;
    seq = insert_rows(&new_primary, seq, 15, 3).await;
    relay.wait_for_log("followed a failover", LONG).await;

    let expected = Expected::read(&new_primary).await;
    assert_eq!(
        expected.rows.len() as u64,
        seq,
        "every event whose commit returned is on the promoted server (synchronous standby)"
    );
    let consumed = expected.consume(&env.broker).await;
    let duplicates = expected.check(&consumed);
    eprintln!(
        "pg17 failover: {seq} events, {} records, {duplicates} duplicates",
        consumed.len()
    );

    // The relay streamed from the synced slot: it created no slot there.
    let (synced, temporary, failover, _) = synced_slot(&new_primary, &env.slot)
        .await
        .expect("the slot exists on the promoted server");
    assert!(
        synced && !temporary && failover,
        "the slot on the promoted server is the synced copy, not a new one"
    );
    let log = relay.log();
    assert_eq!(
        log.matches("created replication slot").count(),
        1,
        "one slot created, on the first primary only:\n{log}"
    );
    assert!(relay.is_running(), "the relay keeps streaming:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg15_relay_stops_at_the_gap_after_a_failover_and_streams_nothing_past_it() {
    let mut env = Env::with_pg(PgCluster::start(PgVersion::V15, &[])).await;
    let standby = start_standby(&env.pg, "standby1", StandbySetup::default()).await;
    let url = two_host_url(&env.pg, &standby, "read-write");
    let primary = env.client().await;

    let (code, out) = run_command(&env, &url, "check", &[]);
    assert!(
        out.contains("PostgreSQL 15 cannot synchronise logical slots")
            && out.contains("replay --from-time"),
        "check says a failover loses the slot on 15 (exit {code}):\n{out}"
    );

    let mut relay = spawn_relay(&env, &url);
    env.wait_streaming(&mut relay).await;
    let seq = insert_rows(&primary, 0, 10, 3).await;
    let before = Expected::read(&primary).await;
    let consumed = before.consume(&env.broker).await;
    before.check(&consumed);
    let delivered: HashSet<String> = before.rows.iter().map(|r| r.id.clone()).collect();

    signal(&relay, libc::SIGSTOP);
    let seq = insert_rows(&primary, seq, 10, 3).await;
    // What the old primary committed (its walsender may already have put some
    // of the second batch into the paused relay's socket: that may arrive).
    let old_primary: HashSet<String> = Expected::read(&primary)
        .await
        .rows
        .iter()
        .map(|r| r.id.clone())
        .collect();
    drop(primary);
    env.pg.stop_with(ShutdownMode::Immediate);
    promote(&standby).await;
    // Someone re-creates the slot on the promoted server (an operator, a
    // cluster manager's slot list): it starts at the current position, so it
    // is not the one the relay confirmed to.
    let new_primary = standby.client().await;
    create_logical_slot(&new_primary, &env.slot).await;
    let slot_at = slot_confirmed_flush_lsn(&new_primary, &env.slot).await;
    signal(&relay, libc::SIGCONT);
    insert_rows(&new_primary, seq, 10, 3).await;

    let status = relay.wait_exit(LONG).await.expect("the relay stops");
    assert!(!status.success());
    let log = relay.log();
    assert!(
        log.contains("from timeline 1 to 2") && log.contains("not a failover slot"),
        "names the gap:\n{log}"
    );
    assert!(
        log.contains("confirmed everything up to")
            && log.contains("last transaction delivered committed at")
            && log.contains("outbox-relay replay --from-time"),
        "names the position, the commit time and the backfill command:\n{log}"
    );

    // A new relay process (restarted by its supervisor) knows nothing of the
    // old slot, but the progress table came over with the data: it stops too.
    let mut fresh = spawn_relay(&env, &url);
    let status = fresh.wait_exit(LONG).await.expect("a new relay stops too");
    assert!(!status.success());
    let log = fresh.log();
    assert!(
        log.contains("did not survive the promotion")
            && log.contains("DELETE FROM public.outbox_relay_progress")
            && log.contains("outbox-relay replay --from-time"),
        "a new process names the lost slot, the backfill and how to move on:\n{log}"
    );

    // Nothing streamed past the gap: Kafka has the first batch, maybe some of
    // what the old primary had sent before it crashed, and nothing of the
    // promoted server's; the re-created slot did not move.
    let mut seen = HashSet::new();
    for topic in Expected::read(&new_primary).await.per_topic().keys() {
        for c in env.broker.consume_for(topic, Duration::from_secs(3)).await {
            seen.insert(c.header_str("id").expect("id header").to_string());
        }
    }
    assert!(
        seen.is_superset(&delivered),
        "the first batch stays delivered"
    );
    let past: Vec<&String> = seen.difference(&old_primary).collect();
    assert!(
        past.is_empty(),
        "events of the promoted server reached Kafka: {past:?}"
    );
    assert_eq!(
        slot_confirmed_flush_lsn(&new_primary, &env.slot).await,
        slot_at,
        "the relay never streamed from the re-created slot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg17_check_and_status_name_each_missing_failover_setting() {
    let env = Env::with_pg(PgCluster::start(PgVersion::V17, &[])).await;
    let standby = start_standby(
        &env.pg,
        "standby1",
        StandbySetup {
            sync_slots: false,
            synchronized_standby_slots: false,
            synchronous: false,
        },
    )
    .await;
    let primary = env.client().await;
    // A slot made without FAILOVER (as before PostgreSQL 17, or by hand).
    create_logical_slot(&primary, &env.slot).await;
    let url = two_host_url(&env.pg, &standby, "read-write");

    let (code, out) = run_command(&env, &url, "check", &[]);
    for needle in [
        "is not a failover slot",
        "(FAILOVER true)",
        "synchronized_standby_slots is empty",
        "ALTER SYSTEM SET synchronized_standby_slots = 'standby1'",
        "sync_replication_slots is off",
        "ALTER SYSTEM SET sync_replication_slots = on",
        "has no synchronised copy of the slot",
    ] {
        assert!(
            out.contains(needle),
            "check names {needle:?} (exit {code}):\n{out}"
        );
    }
    assert_eq!(
        code, 0,
        "failover readiness is a note, not a refusal:\n{out}"
    );

    let status = status_json(&env, &url);
    assert_eq!(status["failover"]["ready"], false, "{status:#}");
    assert_eq!(status["failover"]["slot_failover"], false, "{status:#}");
    assert_eq!(
        status["failover"]["standbys"][0]["physical_slot"], "standby1",
        "{status:#}"
    );

    // The URL lists the standby first: read-write skips it.
    let url = two_host_url(&standby, &env.pg, "read-write");
    let status = status_json(&env, &url);
    assert_eq!(
        status["in_recovery"], false,
        "read-write chose the primary: {status:#}"
    );
}

/// Without `synchronized_standby_slots` the relay can deliver (and confirm)
/// what the standby never received; promoted, the standby's history forks
/// below that position. The relay must stop, not stream on as if the new
/// timeline continued what Kafka has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg17_relay_stops_when_the_promoted_standby_never_received_what_it_delivered() {
    let mut env = Env::with_pg(PgCluster::start(PgVersion::V17, &[])).await;
    let standby = start_standby(
        &env.pg,
        "standby1",
        StandbySetup {
            sync_slots: true,
            synchronized_standby_slots: false,
            synchronous: false,
        },
    )
    .await;
    let url = two_host_url(&env.pg, &standby, "read-write");
    let primary = env.client().await;
    let standby_client = standby.client().await;
    let mut relay = spawn_relay(&env, &url);
    env.wait_streaming(&mut relay).await;
    let seq = insert_rows(&primary, 0, 5, 2).await;
    wait_until(
        LONG,
        "the standby holds a persistent synced copy of the slot",
        || {
            let (primary, standby_client, slot) = (&primary, &standby_client, &env.slot);
            async move {
                nudge(primary).await;
                matches!(
                    synced_slot(standby_client, slot).await,
                    Some((true, false, true, _))
                )
            }
        },
    )
    .await;

    // Cut the standby off (it stops receiving WAL), then write events the
    // relay delivers and confirms but the standby never gets.
    set_and_reload(
        &standby_client,
        "primary_conninfo",
        "host=127.0.0.1 port=1 user=postgres dbname=postgres",
    )
    .await;
    wait_until(LONG, "the standby is disconnected", || async {
        primary
            .query_opt(
                "SELECT 1 FROM pg_stat_replication WHERE application_name = 'standby1'",
                &[],
            )
            .await
            .unwrap()
            .is_none()
    })
    .await;
    insert_rows(&primary, seq, 5, 2).await;
    let end = lsn_to_u64(&current_wal_lsn(&primary).await);
    wait_until(
        LONG,
        "the relay confirmed the events the standby lacks",
        || async { env.confirmed(&primary).await >= end },
    )
    .await;
    let delivered_before = {
        let mut ids = HashSet::new();
        for topic in Expected::read(&primary).await.per_topic().keys() {
            for c in env.broker.consume_for(topic, Duration::from_secs(3)).await {
                ids.insert(c.header_str("id").expect("id header").to_string());
            }
        }
        ids
    };
    assert_eq!(
        delivered_before.len(),
        Expected::read(&primary).await.rows.len()
    );
    drop(primary);
    env.pg.stop_with(ShutdownMode::Immediate);
    promote(&standby).await;
    let new_primary = standby.client().await;
    insert_rows(&new_primary, 1000, 5, 2).await;

    let status = relay.wait_exit(LONG).await.expect("the relay stops");
    assert!(!status.success());
    let log = relay.log();
    assert!(
        log.contains("left timeline 1 at")
            && log.contains("this server never received them")
            && log.contains("synchronized_standby_slots"),
        "names the fork and the setting that prevents it:\n{log}"
    );
    assert!(
        log.contains("outbox-relay replay --from-time"),
        "names the backfill:\n{log}"
    );
    // Nothing from the new timeline reached Kafka.
    let mut after = HashSet::new();
    for topic in Expected::read(&new_primary).await.per_topic().keys() {
        for c in env.broker.consume_for(topic, Duration::from_secs(3)).await {
            after.insert(c.header_str("id").expect("id header").to_string());
        }
    }
    assert_eq!(after, delivered_before, "nothing streamed past the fork");
}
