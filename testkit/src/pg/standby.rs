//! A streaming standby of a harness cluster, for the failover tests: made with
//! `pg_basebackup` (without `-R`: that writes `sslnegotiation` into
//! `primary_conninfo`, which some servers' libpq rejects; `standby.signal` and
//! `primary_conninfo` are written here), a physical slot on the primary, and
//! on PostgreSQL 17 the settings that synchronise failover slots.
#![allow(dead_code)]

use super::*;
use crate::process::temp_dir as test_temp_dir;
use crate::{set_and_reload, wait_until};

/// How the standby is set up.
#[derive(Clone, Copy, Debug)]
pub struct StandbySetup {
    /// PostgreSQL 17: `sync_replication_slots = on` on the standby and
    /// `synchronized_standby_slots` on the primary (off: a standby that is not
    /// failover-ready, for `check`).
    pub sync_slots: bool,
    /// PostgreSQL 17: list the standby's slot in the primary's
    /// `synchronized_standby_slots` (with `sync_slots`): logical decoding never
    /// gets ahead of the standby.
    pub synchronized_standby_slots: bool,
    /// `synchronous_standby_names` on the primary: a commit returns only once
    /// the standby has it, so a crash of the primary loses no committed event.
    pub synchronous: bool,
}

impl Default for StandbySetup {
    fn default() -> Self {
        StandbySetup {
            sync_slots: true,
            synchronized_standby_slots: true,
            synchronous: true,
        }
    }
}

/// Starts a hot standby of `primary` streaming from a new physical slot
/// `name` (also its application_name), waits until it streams, then applies
/// `setup` on the primary. The primary must be running.
pub async fn start_standby(primary: &PgCluster, name: &str, setup: StandbySetup) -> PgCluster {
    let client = primary.client().await;
    client
        .execute(
            "SELECT pg_create_physical_replication_slot($1, true)",
            &[&name],
        )
        .await
        .expect("create the standby's physical slot");
    let version = primary.version;
    let bindir = primary.bindir.clone();
    let run_as = primary.run_as;
    let dir = test_temp_dir(&format!("outbox-relay-pg{version}-standby-"));
    let root = dir.path().to_path_buf();
    fs::create_dir(root.join("sock")).expect("create socket dir");
    if let Some((uid, gid)) = run_as {
        for p in [root.clone(), root.join("sock")] {
            std::os::unix::fs::chown(&p, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", p.display()));
        }
    }
    let data = root.join("data");
    super::run_tool(
        command_as(&bindir.join("pg_basebackup"), run_as)
            .current_dir(&root)
            .arg("-D")
            .arg(&data)
            .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
            .args(["-U", "postgres", "-X", "stream", "-S", name])
            .args(["-c", "fast", "--no-sync"]),
        &format!("pg_basebackup (PostgreSQL {version})"),
    );
    // postgresql.auto.conf is read last: these win over the primary's copied
    // postgresql.conf (its socket directory, say).
    let mut conf = String::from("\n# --- outbox-relay test harness: standby ---\n");
    let primary_conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres application_name={name}",
        primary.port
    );
    let mut settings: Vec<(&str, String)> = vec![
        (
            "unix_socket_directories",
            root.join("sock").to_str().expect("utf-8 path").to_string(),
        ),
        ("primary_conninfo", primary_conninfo),
        ("primary_slot_name", name.to_string()),
        ("hot_standby", "on".into()),
        ("hot_standby_feedback", "on".into()),
        // Not inherited: once promoted it has no standby of its own.
        ("synchronous_standby_names", String::new()),
    ];
    if version.major() >= 17 {
        settings.push((
            "sync_replication_slots",
            if setup.sync_slots { "on" } else { "off" }.into(),
        ));
        settings.push(("synchronized_standby_slots", String::new()));
    }
    for (k, v) in &settings {
        conf.push_str(&format!("{k} = '{}'\n", v.replace('\'', "''")));
    }
    let auto = data.join("postgresql.auto.conf");
    OpenOptions::new()
        .append(true)
        .open(&auto)
        .and_then(|mut f| f.write_all(conf.as_bytes()))
        .unwrap_or_else(|e| panic!("append to {}: {e}", auto.display()));
    let signal_file = data.join("standby.signal");
    fs::write(&signal_file, b"").expect("write standby.signal");
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(&signal_file, Some(uid), Some(gid)).expect("chown standby.signal");
    }

    let mut standby = PgCluster {
        version,
        bindir,
        dir: Some(dir),
        port: 0,
        run_as,
        child: None,
    };
    let mut attempts = 0;
    loop {
        attempts += 1;
        standby.port = free_port();
        match standby.spawn_and_wait() {
            Ok(()) => break,
            Err(StartError::PortTaken) if attempts < 5 => continue,
            Err(e) => panic!(
                "standby (PostgreSQL {version}) did not start: {e}\n--- log ---\n{}",
                tail(&standby.log(), 60)
            ),
        }
    }
    wait_until(START_TIMEOUT, "the standby streams from the primary", || {
        let client = &client;
        async move {
            client
                .query_opt(
                    "SELECT 1 FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming'",
                    &[&name],
                )
                .await
                .ok()
                .flatten()
                .is_some()
        }
    })
    .await;
    if version.major() >= 17 && setup.sync_slots && setup.synchronized_standby_slots {
        set_and_reload(&client, "synchronized_standby_slots", name).await;
    }
    if setup.synchronous {
        set_and_reload(&client, "synchronous_standby_names", name).await;
    }
    standby
}

/// `pg_ctl promote -w`, then waits until the server accepts writes.
pub async fn promote(standby: &PgCluster) {
    let out = command_as(&standby.bindir.join("pg_ctl"), standby.run_as)
        .current_dir(standby.root())
        .arg("promote")
        .arg("-D")
        .arg(standby.data_dir())
        .args(["-w", "-t", "120"])
        .output()
        .unwrap_or_else(|e| panic!("run pg_ctl promote: {e}"));
    if !out.status.success() {
        panic!(
            "pg_ctl promote failed with {}:\n{}\n{}\n--- log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&standby.log(), 60)
        );
    }
    wait_until(
        START_TIMEOUT,
        "the promoted standby accepts writes",
        || async {
            match standby.try_client().await {
                Ok(c) => c
                    .query_one("SELECT NOT pg_is_in_recovery()", &[])
                    .await
                    .is_ok_and(|r| r.get::<_, bool>(0)),
                Err(_) => false,
            }
        },
    )
    .await;
}

/// The relay's slot on `cluster` as `pg_replication_slots` shows it:
/// (synced, temporary, failover, confirmed_flush_lsn); PostgreSQL 17+.
pub async fn synced_slot(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Option<(bool, bool, bool, Option<String>)> {
    client
        .query_opt(
            "SELECT synced, temporary, failover, confirmed_flush_lsn::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("read pg_replication_slots")
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
}

/// `postgres://postgres@127.0.0.1:P1,127.0.0.1:P2/postgres?...`: both servers,
/// the first one first.
pub fn two_host_url(first: &PgCluster, second: &PgCluster, attrs: &str) -> String {
    format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs={attrs}",
        first.port, second.port
    )
}
