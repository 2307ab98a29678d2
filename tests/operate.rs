//! Operating the relay: metrics and readiness under load and under a paused
//! broker, `status --json`, bookmarks and replay, `--start-lsn`, `peek`.

mod harness;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use harness::outbox::{insert_rows, Env, Expected, DEADLINE};
use harness::scrape::{get, http_addr, sample};
use harness::{current_wal_lsn, lsn_to_u64, wait_until, PgVersion, RelayProcess};

/// Run a one-shot relay command (status, bookmark, replay, peek) to completion.
fn command(env: &Env, args: &[&str]) -> (i32, String, String) {
    let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    full.extend([
        "--postgres-url".to_string(),
        env.pg.url(),
        "--slot".to_string(),
        env.slot.clone(),
        "--publication".to_string(),
        env.publication.clone(),
    ]);
    if matches!(args[0], "replay") {
        full.extend(["--kafka-brokers".to_string(), env.broker.bootstrap()]);
    }
    let out = Command::new(RelayProcess::binary())
        .args(&full)
        .output()
        .expect("run the relay binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Value of an unlabelled sample (or the sum over its labels).
fn metric(text: &str, name: &str) -> f64 {
    sample(text, name, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_readiness_follow_load_and_broker_pause() {
    let mut env = Env::new(PgVersion::V17).await;
    let client = env.client().await;
    let mut relay = RelayProcess::spawn(
        &env.args(&["--ready-stall-timeout", "3s"]),
        &[("RUST_LOG", "info")],
    );
    env.wait_streaming(&mut relay).await;
    let addr = http_addr(&mut relay).await;
    assert_eq!(get(&addr, "/healthz").await.0, 200);
    let n = insert_rows(&client, 0, 20, 5).await;
    let expected = Expected::read(&client).await;
    expected.check(&expected.consume(&env.broker).await);
    wait_until(DEADLINE, "metrics count every produced record", || {
        let addr = addr.clone();
        async move {
            let (_, body) = get(&addr, "/metrics").await;
            metric(&body, "outbox_relay_produced_records_total") >= n as f64
                && metric(&body, "outbox_relay_end_to_end_latency_seconds_count") >= n as f64
                && metric(&body, "outbox_relay_in_flight_records") == 0.0
                && metric(&body, "outbox_relay_confirmed_lsn") > 0.0
        }
    })
    .await;
    assert_eq!(get(&addr, "/readyz").await.0, 200);

    // Broker hangs: records stay in flight, readiness drops, lag grows.
    env.broker.pause();
    insert_rows(&client, n, 10, 3).await;
    client
        .batch_execute(
            "CREATE TABLE noise(x int); INSERT INTO noise SELECT generate_series(1, 50000)",
        )
        .await
        .unwrap();
    wait_until(
        DEADLINE,
        "readiness drops while acknowledgements stall",
        || {
            let addr = addr.clone();
            async move { get(&addr, "/readyz").await.0 == 503 }
        },
    )
    .await;
    let (_, body) = get(&addr, "/metrics").await;
    assert!(
        metric(&body, "outbox_relay_in_flight_records") > 0.0,
        "{body}"
    );
    wait_until(DEADLINE, "lag in bytes is sampled and grows", || {
        let addr = addr.clone();
        async move {
            metric(
                &get(&addr, "/metrics").await.1,
                "outbox_relay_slot_lag_bytes",
            ) > 100_000.0
        }
    })
    .await;

    env.broker.resume();
    wait_until(DEADLINE, "readiness and the window recover", || {
        let addr = addr.clone();
        async move {
            let (code, body) = get(&addr, "/readyz").await;
            let (_, metrics) = get(&addr, "/metrics").await;
            code == 200
                && !body.is_empty()
                && metric(&metrics, "outbox_relay_in_flight_records") == 0.0
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_and_exit_codes() {
    let env = Env::new(PgVersion::V15).await;
    let client = env.client().await;
    let (code, _, err) = command(&env, &["status", "--json"]);
    assert_eq!(code, 1, "a missing slot exits 1: {err}");
    let mut relay = env.relay();
    env.wait_streaming(&mut relay).await;
    insert_rows(&client, 0, 5, 2).await;
    let end = lsn_to_u64(&current_wal_lsn(&client).await);
    wait_until(DEADLINE, "slot confirms the rows", || async {
        env.confirmed(&client).await >= end
    })
    .await;
    // The relay keeps confirming (keepalives, its progress record's own WAL),
    // so the slot may move while `status` runs: what it shows must lie between
    // the slot's position just before and just after.
    let before = env.confirmed(&client).await;
    let (code, out, err) = command(&env, &["status", "--json"]);
    let after = env.confirmed(&client).await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("status --json is JSON");
    let text = v.to_string();
    let shown = v["slot"]["confirmed_flush_lsn"]
        .as_str()
        .map(lsn_to_u64)
        .unwrap_or_else(|| panic!("slot.confirmed_flush_lsn in {text}"));
    assert!(
        (before..=after).contains(&shown),
        "confirmed LSN {shown:X} not within {before:X}..={after:X} in {text}"
    );
    assert!(text.contains("pgoutput"), "{text}");
    assert!(text.contains("outbox_events"), "publication tables: {text}");
    // The slot's identity: the cluster and timeline it lives on.
    let sysid = harness::system_identifier(&client).await;
    assert_eq!(v["identity"]["system_identifier"], sysid.as_str(), "{text}");
    assert_eq!(v["identity"]["timeline"], 1, "{text}");
    // The human form names the slot too.
    let (code, out, _) = command(&env, &["status"]);
    assert_eq!(code, 0);
    assert!(out.contains(&env.slot), "{out}");
    // A retained-WAL threshold of one byte trips exit code 3.
    let (code, _, _) = command(&env, &["status", "--max-retained-bytes", "1"]);
    assert_eq!(code, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmark_replay_redelivers_exactly_what_came_after() {
    let env = Env::new(PgVersion::V17).await;
    let client = env.client().await;
    let mut relay = env.relay();
    env.wait_streaming(&mut relay).await;
    let a_end = insert_rows(&client, 0, 10, 3).await;
    let after_a = lsn_to_u64(&current_wal_lsn(&client).await);
    wait_until(DEADLINE, "slot confirms batch A", || async {
        env.confirmed(&client).await >= after_a
    })
    .await;
    let (code, out, err) = command(&env, &["bookmark", "create", "before_b"]);
    assert_eq!(code, 0, "{out}{err}");
    let b_end = insert_rows(&client, a_end, 10, 3).await;
    let all = Expected::read(&client).await;
    all.check(&all.consume(&env.broker).await);

    let (code, out, err) = command(
        &env,
        &[
            "replay",
            "--from-bookmark",
            "before_b",
            "--topic-override",
            "replayed",
        ],
    );
    assert_eq!(code, 0, "replay: {out}{err}");
    let replayed = env
        .broker
        .consume("replayed", (b_end - a_end) as usize, DEADLINE)
        .await;
    let extra = env
        .broker
        .consume_for("replayed", Duration::from_secs(2))
        .await;
    assert_eq!(
        extra.len(),
        (b_end - a_end) as usize,
        "exactly batch B, once"
    );
    let batch_b: HashSet<&str> = all
        .rows
        .iter()
        .filter(|r| r.seq >= a_end)
        .map(|r| r.id.as_str())
        .collect();
    let got: HashSet<&str> = replayed
        .iter()
        .map(|c| c.header_str("id").unwrap())
        .collect();
    assert_eq!(
        got, batch_b,
        "the replay holds exactly the events committed after the bookmark"
    );
    assert!(replayed
        .iter()
        .all(|c| c.header_str("replay") == Some("bookmark:before_b")));
    // The bookmark is dropped after a successful replay.
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE '%_bookmark_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_lsn_below_confirmed_is_refused_and_table_replay_works() {
    let env = Env::new(PgVersion::V15).await;
    let client = env.client().await;
    let mut relay = env.relay();
    env.wait_streaming(&mut relay).await;
    let n = insert_rows(&client, 0, 8, 3).await;
    let end = lsn_to_u64(&current_wal_lsn(&client).await);
    wait_until(DEADLINE, "slot confirms the rows", || async {
        env.confirmed(&client).await >= end
    })
    .await;
    relay.sigterm();
    relay.wait_exit(DEADLINE).await.expect("relay stops");

    let mut again = RelayProcess::spawn(&env.args(&["--start-lsn", "0/1"]), &[]);
    let status = again.wait_exit(DEADLINE).await.expect("refused at once");
    assert!(!status.success());
    assert!(again.log().contains("cannot rewind"), "{}", again.log());

    // Rows still in the table can be re-published from it.
    let (code, out, err) = command(
        &env,
        &[
            "replay",
            "--from-time",
            "2000-01-01",
            "--topic-override",
            "from_table",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let got = env.broker.consume("from_table", n as usize, DEADLINE).await;
    assert_eq!(got.len(), n as usize);
    assert!(got.iter().all(|c| c.header_str("replay") == Some("table")));
    let ids: HashSet<&str> = got.iter().map(|c| c.header_str("id").unwrap()).collect();
    assert_eq!(ids.len(), n as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peek_shows_pending_events_without_consuming() {
    let env = Env::new(PgVersion::V15).await;
    let client = env.client().await;
    env.create_slot().await;
    insert_rows(&client, 0, 6, 1).await;
    let (code, out, err) = command(&env, &["peek", "--limit", "3", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().count(),
        3,
        "peek --limit 3 printed {} lines",
        out.lines().count()
    );
    assert!(out.contains("outbox.event."), "{out}");
    // Nothing was consumed: the relay still delivers all six.
    let mut relay = env.relay();
    env.wait_streaming(&mut relay).await;
    let expected = Expected::read(&client).await;
    assert_eq!(expected.check(&expected.consume(&env.broker).await), 0);
}

/// The value of `outbox_relay_role{role=...}`.
fn role(text: &str, role: &str) -> f64 {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("/metrics parses");
    scrape
        .samples
        .iter()
        .find(|s| s.metric == "outbox_relay_role" && s.labels.get("role") == Some(role))
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => -1.0,
        })
        .unwrap_or(-1.0)
}

/// Two relays on one slot: the second is a healthy standby, so it is ready
/// (200, the body says "standby") and its role gauge says standby, while the
/// first streams; when the first dies the second streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_is_ready_and_says_so() {
    let env = Env::new(PgVersion::V17).await;
    let mut first = env.relay();
    env.wait_streaming(&mut first).await;
    let first_addr = http_addr(&mut first).await;
    let mut second = RelayProcess::spawn(
        &env.args(&["--slot-busy-retry", "1s"]),
        &[("RUST_LOG", "info")],
    );
    let second_addr = http_addr(&mut second).await;
    wait_until(DEADLINE, "the second relay is a ready standby", || {
        let addr = second_addr.clone();
        async move {
            let (code, body) = get(&addr, "/readyz").await;
            code == 200 && body.starts_with("ready: standby")
        }
    })
    .await;
    let (_, body) = get(&second_addr, "/metrics").await;
    assert_eq!(role(&body, "standby"), 1.0, "{body}");
    assert_eq!(role(&body, "streaming"), 0.0, "{body}");
    assert_eq!(metric(&body, "outbox_relay_streaming"), 0.0, "{body}");
    // The standby samples the slot too: its gauges are live, not zeros.
    assert!(
        metric(&body, "outbox_relay_slot_sample_age_seconds") >= 0.0,
        "{body}"
    );
    let (code, body) = get(&first_addr, "/readyz").await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    let (_, body) = get(&first_addr, "/metrics").await;
    assert_eq!(role(&body, "streaming"), 1.0, "{body}");

    first.kill9();
    wait_until(DEADLINE, "the standby takes over and streams", || {
        let addr = second_addr.clone();
        async move {
            let (code, body) = get(&addr, "/readyz").await;
            let (_, metrics) = get(&addr, "/metrics").await;
            code == 200 && body == "ready\n" && role(&metrics, "streaming") == 1.0
        }
    })
    .await;
}

/// The relay's SQL connections are terminated (by an operator, a pooler, a
/// failover): the slot gauges keep moving and the sample age stays small (the
/// lag sampler opens a connection per sample, so it holds none to lose; the
/// watcher samples over its own when the session does not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_gauges_keep_moving_after_sql_connections_are_killed() {
    let env = Env::new(PgVersion::V15).await;
    let client = env.client().await;
    let mut relay = RelayProcess::spawn(&env.args(&[]), &[("RUST_LOG", "info")]);
    env.wait_streaming(&mut relay).await;
    let addr = http_addr(&mut relay).await;
    wait_until(DEADLINE, "a first slot sample", || {
        let addr = addr.clone();
        async move {
            metric(
                &get(&addr, "/metrics").await.1,
                "outbox_relay_slot_sample_age_seconds",
            ) >= 0.0
        }
    })
    .await;
    // Every SQL (not replication) connection of the relay open right now
    // (often none: the sampler connects per sample).
    let _killed: i64 = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'outbox-relay' AND backend_type = 'client backend'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    client
        .batch_execute("CREATE TABLE filler AS SELECT g FROM generate_series(1, 20000) g")
        .await
        .unwrap();
    let after = lsn_to_u64(&current_wal_lsn(&client).await) as f64;
    wait_until(
        Duration::from_secs(60),
        "the server WAL gauge passes the WAL written after the kill",
        || {
            let addr = addr.clone();
            async move {
                let body = get(&addr, "/metrics").await.1;
                metric(&body, "outbox_relay_server_wal_lsn") >= after
                    && metric(&body, "outbox_relay_slot_sample_age_seconds") < 20.0
            }
        },
    )
    .await;
    assert_eq!(get(&addr, "/readyz").await.0, 200);
}

/// A relay that stops on an invalidated slot shows it before it exits:
/// `wal_status="lost"` on /metrics and the reason on /readyz, for long
/// enough to be scraped (the SlotLost alert could never fire before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_is_visible_before_the_relay_exits() {
    let pg = harness::PgCluster::start(
        PgVersion::V17,
        &[("max_slot_wal_keep_size", "1MB"), ("wal_keep_size", "0")],
    );
    let env = Env::with_pg(pg).await;
    let client = env.client().await;
    let mut relay = env.relay();
    env.wait_streaming(&mut relay).await;
    relay.kill9();
    client
        .batch_execute("CREATE TABLE filler AS SELECT 1 AS x")
        .await
        .unwrap();
    wait_until(DEADLINE, "the slot loses its WAL", || async {
        client
            .batch_execute(
                "INSERT INTO filler SELECT g FROM generate_series(1, 20000) g;
                 SELECT pg_switch_wal(); CHECKPOINT;",
            )
            .await
            .unwrap();
        client
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&env.slot],
            )
            .await
            .unwrap()
            .get::<_, Option<String>>(0)
            .as_deref()
            == Some("lost")
    })
    .await;
    let mut relay = env.relay();
    let addr = http_addr(&mut relay).await;
    wait_until(
        DEADLINE,
        "the lost slot shows on /metrics and /readyz",
        || {
            let addr = addr.clone();
            async move {
                let (code, body) = get(&addr, "/readyz").await;
                code == 503
                    && body.contains("invalidated")
                    && get(&addr, "/metrics")
                        .await
                        .1
                        .contains("outbox_relay_slot_wal_status{status=\"lost\"} 1")
            }
        },
    )
    .await;
    let status = relay
        .wait_exit(Duration::from_secs(90))
        .await
        .expect("the relay exits after showing it");
    assert_eq!(status.code(), Some(1));
}

/// `--to-lsn` at or below the bookmark's position is an empty range: refused,
/// the bookmark kept. A real replay prints how many records it sent and logs
/// its end as `--to-lsn`. Table replay by a uuid id needs --force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_ranges_are_exact_and_say_what_they_did() {
    let env = Env::new(PgVersion::V17).await;
    let client = env.client().await;
    let mut relay = env.relay();
    env.wait_streaming(&mut relay).await;
    let a_end = insert_rows(&client, 0, 4, 2).await;
    let after_a = lsn_to_u64(&current_wal_lsn(&client).await);
    wait_until(DEADLINE, "slot confirms batch A", || async {
        env.confirmed(&client).await >= after_a
    })
    .await;
    let (code, out, err) = command(&env, &["bookmark", "create", "bm"]);
    assert_eq!(code, 0, "{out}{err}");
    let bookmark = format!("{}_bookmark_bm", env.slot);
    let position: String = client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&bookmark],
        )
        .await
        .unwrap()
        .get(0);
    let b_end = insert_rows(&client, a_end, 6, 3).await;
    let bookmark_exists = || async {
        client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&bookmark],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    };
    for to in [position.as_str(), "0/1"] {
        let (code, out, err) = command(&env, &["replay", "--from-bookmark", "bm", "--to-lsn", to]);
        assert_eq!(code, 1, "--to-lsn {to}: {out}{err}");
        assert!(err.contains("is kept") && err.contains("empty"), "{err}");
        assert!(
            bookmark_exists().await,
            "--to-lsn {to} dropped the bookmark"
        );
    }
    let (code, out, err) = command(
        &env,
        &[
            "replay",
            "--from-bookmark",
            "bm",
            "--keep-bookmark",
            "--topic-override",
            "again",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let n = b_end - a_end;
    assert!(
        out.contains(&format!(": {n} records sent, commits in [{position}, ")),
        "{out}"
    );
    assert!(
        err.contains("--to-lsn"),
        "the end is logged as --to-lsn: {err}"
    );
    assert!(bookmark_exists().await);

    // The shipped table's ids are random uuids: replay by id is refused...
    let zero = "00000000-0000-0000-0000-000000000000";
    let (code, out, err) = command(&env, &["replay", "--from-id", zero]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("--force") && err.contains("uuid"), "{err}");
    // ... unless forced.
    let (code, out, err) = command(
        &env,
        &[
            "replay",
            "--from-id",
            zero,
            "--force",
            "--topic-override",
            "by_id",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("replayed {b_end} rows")), "{out}");
}

/// A bookmark left behind shows on /metrics (retained WAL, age) and, when
/// asked, in `status`'s exit code (5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaked_bookmark_is_visible() {
    let env = Env::new(PgVersion::V17).await;
    let client = env.client().await;
    let mut relay = RelayProcess::spawn(&env.args(&[]), &[("RUST_LOG", "info")]);
    env.wait_streaming(&mut relay).await;
    let addr = http_addr(&mut relay).await;
    let (code, out, err) = command(&env, &["bookmark", "create", "leak"]);
    assert_eq!(code, 0, "{out}{err}");
    client
        .batch_execute("CREATE TABLE filler AS SELECT g FROM generate_series(1, 20000) g")
        .await
        .unwrap();
    let retained = |body: &str| {
        body.lines()
            .find(|l| l.starts_with("outbox_relay_bookmark_retained_wal_bytes{bookmark=\"leak\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    wait_until(DEADLINE, "the bookmark's gauges", || {
        let addr = addr.clone();
        async move {
            let body = get(&addr, "/metrics").await.1;
            retained(&body).is_some_and(|r| r > 100_000.0)
                && body.contains("outbox_relay_bookmark_age_seconds{bookmark=\"leak\"}")
        }
    })
    .await;
    let (code, _, err) = command(&env, &["status"]);
    assert_eq!(code, 0, "the bookmark check is opt-in: {err}");
    let (code, _, err) = command(&env, &["status", "--max-bookmark-retained-bytes", "1KiB"]);
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("\"leak\"") && err.contains("bookmark drop leak"),
        "{err}"
    );
    let (code, _, err) = command(&env, &["status", "--max-bookmark-retained-bytes", "100GiB"]);
    assert_eq!(code, 0, "{err}");
    // Dropped: its series goes away.
    let (code, out, err) = command(&env, &["bookmark", "drop", "leak"]);
    assert_eq!(code, 0, "{out}{err}");
    wait_until(DEADLINE, "the dropped bookmark's series goes", || {
        let addr = addr.clone();
        async move { retained(&get(&addr, "/metrics").await.1).is_none() }
    })
    .await;
}

/// `peek --limit 1` on a slot whose first transaction is large holds one
/// message at a time (it used to load the whole transaction's rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peek_streams_a_large_first_transaction() {
    let env = Env::new(PgVersion::V15).await;
    let client = env.client().await;
    env.create_slot().await;
    // One transaction of ~120 MB of rows.
    client
        .execute(
            "INSERT INTO outbox_events (aggregatetype, aggregateid, type, payload) \
             SELECT 'Big', g::text, 'Made', jsonb_build_object('pad', repeat('x', 3000)) \
             FROM generate_series(1, 40000) g",
            &[],
        )
        .await
        .unwrap();
    let out = tempfile::NamedTempFile::new().unwrap();
    // Reaped below with wait4, which also gives its peak RSS.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(RelayProcess::binary())
        .args([
            "peek",
            "--limit",
            "1",
            "--json",
            "--postgres-url",
            &env.pg.url(),
            "--slot",
            &env.slot,
            "--publication",
            &env.publication,
        ])
        .stdout(out.reopen().unwrap())
        .spawn()
        .expect("run peek");
    let pid = child.id() as libc::pid_t;
    let (status, max_rss_kib) = tokio::task::spawn_blocking(move || {
        let mut status = 0;
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waits for our own child; both pointers are valid locals.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        assert_eq!(r, pid, "wait4");
        (status, usage.ru_maxrss)
    })
    .await
    .unwrap();
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    let printed = std::fs::read_to_string(out.path()).unwrap();
    assert_eq!(printed.lines().count(), 1, "{printed}");
    eprintln!("peek --limit 1 over a 40,000-row transaction: peak RSS {max_rss_kib} KiB");
    assert!(max_rss_kib < 48 * 1024, "peak RSS {max_rss_kib} KiB");
}

/// Every WAL sender taken (SQLSTATE 53300): the relay retries, says why in its
/// log and in /readyz, and streams once a sender is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_wal_senders_are_named_while_the_relay_retries() {
    let pg = harness::PgCluster::start(PgVersion::V17, &[("max_wal_senders", "1")]);
    let env = Env::with_pg(pg).await;
    let holder = outbox_relay::replication::ReplicationClient::connect(
        &outbox_relay::replication::ConnectConfig {
            host: "127.0.0.1".into(),
            port: env.pg.port(),
            user: "postgres".into(),
            password: None,
            dbname: "postgres".into(),
            application_name: "sender-hog".into(),
            connect_timeout: Duration::from_secs(10),
            max_frame_bytes: 16 << 20,
            tls: Default::default(),
        },
    )
    .await
    .expect("the one WAL sender");
    let mut relay = RelayProcess::spawn(&env.args(&[]), &[("RUST_LOG", "info")]);
    let addr = http_addr(&mut relay).await;
    wait_until(DEADLINE, "/readyz names the busy WAL senders", || {
        let addr = addr.clone();
        async move {
            let (code, body) = get(&addr, "/readyz").await;
            code == 503 && body.contains("all 1 WAL senders") && body.contains("53300")
        }
    })
    .await;
    assert!(
        relay.log().contains("the relay cannot start streaming"),
        "{}",
        relay.log()
    );
    drop(holder);
    env.wait_streaming(&mut relay).await;
    wait_until(DEADLINE, "ready once a sender is free", || {
        let addr = addr.clone();
        async move { get(&addr, "/readyz").await == (200, "ready\n".to_string()) }
    })
    .await;
}
