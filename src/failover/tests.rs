use super::*;
use crate::config::{PostgresConfig, Severity};

fn primary17() -> Readiness {
    Readiness {
        server_version_num: 170002,
        slot_failover: Some(true),
        synchronized_standby_slots: vec!["standby1".into()],
        standbys: vec![StandbyLink {
            application_name: "standby1".into(),
            client_addr: Some("10.0.0.2".into()),
            state: "streaming".into(),
            physical_slot: Some("standby1".into()),
        }],
        other_hosts: vec![StandbyView {
            host: "h2:5432".into(),
            unreadable: None,
            in_recovery: true,
            sync_replication_slots: Some(true),
            hot_standby_feedback: Some(true),
            primary_slot_name: Some("standby1".into()),
            primary_conninfo_has_dbname: Some(true),
            slot: Some(SyncedSlot {
                synced: true,
                temporary: false,
                confirmed_flush_lsn: Some("0/10".into()),
            }),
        }],
        ready: false,
        findings: Vec::new(),
    }
}

fn whats(r: &Readiness) -> Vec<String> {
    let found = judge("outbox_relay", r);
    assert!(found.iter().all(|p| p.severity == Severity::Info));
    found.into_iter().map(|p| format!("{p}")).collect()
}

#[test]
fn a_ready_cluster_has_no_findings() {
    assert!(whats(&primary17()).is_empty(), "{:?}", whats(&primary17()));
}

#[test]
fn before_17_a_failover_loses_the_slot() {
    let mut r = primary17();
    r.server_version_num = 150004;
    let w = whats(&r);
    assert_eq!(w.len(), 1);
    assert!(w[0].contains("PostgreSQL 15 cannot synchronise"), "{w:?}");
    assert!(w[0].contains("replay --from-time"), "{w:?}");
}

#[test]
fn each_missing_setting_is_named_with_its_fix() {
    let mut r = primary17();
    r.slot_failover = Some(false);
    r.synchronized_standby_slots.clear();
    let h = &mut r.other_hosts[0];
    h.sync_replication_slots = Some(false);
    h.hot_standby_feedback = Some(false);
    h.primary_slot_name = None;
    h.primary_conninfo_has_dbname = Some(false);
    h.slot = None;
    let w = whats(&r).join("\n");
    for needle in [
        "not a failover slot",
        "ALTER_REPLICATION_SLOT \"outbox_relay\" (FAILOVER true)",
        "synchronized_standby_slots is empty",
        "synchronized_standby_slots = 'standby1'",
        "sync_replication_slots is off",
        "hot_standby_feedback is off",
        "primary_slot_name is not set",
        "primary_conninfo names no dbname",
        "no synchronised copy",
    ] {
        assert!(w.contains(needle), "missing {needle:?} in:\n{w}");
    }
}

#[test]
fn standbys_and_listed_slots_must_match() {
    let mut r = primary17();
    r.standbys[0].physical_slot = None;
    let w = whats(&r).join("\n");
    assert!(w.contains("without a physical replication slot"), "{w}");
    // standby1 is listed but nobody streams from it: decoding waits.
    assert!(w.contains("no standby streams from it"), "{w}");
    let mut r = primary17();
    r.standbys[0].physical_slot = Some("other".into());
    let w = whats(&r).join("\n");
    assert!(
        w.contains("\"other\", which synchronized_standby_slots does not list"),
        "{w}"
    );
    let mut r = primary17();
    r.standbys.clear();
    r.other_hosts.clear();
    let w = whats(&r).join("\n");
    assert!(w.contains("no standby streams from this server"), "{w}");
}

#[test]
fn a_temporary_synced_copy_is_not_ready() {
    let mut r = primary17();
    r.other_hosts[0].slot.as_mut().unwrap().temporary = true;
    let w = whats(&r).join("\n");
    assert!(w.contains("temporary copy"), "{w}");
}

#[test]
fn primary_conninfo_dbname_forms() {
    assert!(has_dbname("host=a port=5432 user=r dbname=app"));
    assert!(!has_dbname("host=a port=5432 user=r"));
    assert!(has_dbname("postgresql://r@a:5432/app"));
    assert!(!has_dbname("postgresql://r@a:5432"));
}

#[test]
fn session_attrs_follow_libpq() {
    let standby = ServerRole {
        in_hot_standby: true,
        read_only: true,
    };
    let read_only = ServerRole {
        in_hot_standby: false,
        read_only: true,
    };
    let primary = ServerRole {
        in_hot_standby: false,
        read_only: false,
    };
    assert!(!standby.satisfies(SessionAttrs::ReadWrite));
    assert!(!read_only.satisfies(SessionAttrs::ReadWrite));
    assert!(read_only.satisfies(SessionAttrs::Primary));
    assert!(primary.satisfies(SessionAttrs::ReadWrite));
    assert!(standby.satisfies(SessionAttrs::Any));
    assert!(!standby.satisfies(SessionAttrs::Primary));
}

fn pg(url: &str) -> PostgresConfig {
    PostgresConfig {
        url: url.into(),
        ..Default::default()
    }
}

#[test]
fn multi_host_urls_and_conninfo_list_every_host_in_order() {
    for url in [
        "postgresql://u@h1:5432,h2:5433/db?target_session_attrs=read-write",
        "host=h1,h2 port=5432,5433 user=u dbname=db target_session_attrs=read-write",
    ] {
        let (targets, attrs) = pg(url).replication_targets().unwrap();
        assert_eq!(attrs, SessionAttrs::ReadWrite, "{url}");
        let hosts: Vec<(String, u16)> = targets.iter().map(|t| (t.host.clone(), t.port)).collect();
        assert_eq!(
            hosts,
            [("h1".to_string(), 5432), ("h2".to_string(), 5433)],
            "{url}"
        );
        assert!(targets.iter().all(|t| t.dbname == "db" && t.user == "u"));
        assert_eq!(targets[1].tls.server_name, "h2");
        // Pinned: every connection goes to that host only.
        let pinned = pg(url).pinned_to(1);
        let (one, _) = pinned.replication_targets().unwrap();
        assert_eq!(
            (one.len(), one[0].host.as_str(), one[0].port),
            (1, "h2", 5433)
        );
        let sql = pinned.sql_config().unwrap();
        assert_eq!(sql.get_ports(), [5433]);
        assert_eq!(sql.get_dbname(), Some("db"));
        assert_eq!(pinned.sql_targets().unwrap().0.len(), 1);
    }
    // One port for all hosts.
    let (t, attrs) = pg("host=h1,h2 port=6000 user=u")
        .replication_targets()
        .unwrap();
    assert_eq!(
        (t[0].port, t[1].port, attrs),
        (6000, 6000, SessionAttrs::Any)
    );
    let (t, _) = pg("postgres://u@h1,h2/db?target_session_attrs=primary")
        .replication_targets()
        .unwrap();
    assert_eq!((t[0].port, t[1].port), (5432, 5432));
}

#[test]
fn multi_host_mistakes_name_their_fix() {
    let err = |url: &str| pg(url).replication_targets().unwrap_err().to_string();
    let e = err("host=h1,h2,h3 port=1,2 user=u");
    assert!(e.contains("3 hosts but 2 ports"), "{e}");
    let e = err("postgres://u@h1,h2/db?target_session_attrs=standby");
    assert!(e.contains("target_session_attrs=standby"), "{e}");
    assert!(e.contains("read-write"), "{e}");
    let e = err("postgres://u@h1,h2/db?target_session_attrs=sometimes");
    assert!(e.contains("unknown target_session_attrs"), "{e}");
}

#[test]
fn status_text_says_ready_or_not_and_why() {
    let mut r = primary17();
    r.ready = true;
    let text = render_text(&r);
    assert!(
        text.contains("READY: a failover carries the slot over"),
        "{text}"
    );
    assert!(
        text.contains("standby1 10.0.0.2 (streaming), physical slot standby1"),
        "{text}"
    );
    r.ready = false;
    r.slot_failover = Some(false);
    r.findings = judge("s", &r);
    let text = render_text(&r);
    assert!(text.contains("NOT READY"), "{text}");
    assert!(text.contains("  failover slot      NO\n"), "{text}");
    assert!(
        text.contains("warning") && text.contains("not a failover slot"),
        "{text}"
    );
    // JSON: findings as what/fix pairs.
    let json = serde_json::to_value(&r).unwrap();
    assert!(json["findings"][0]["fix"]
        .as_str()
        .unwrap()
        .contains("FAILOVER true"));
}
