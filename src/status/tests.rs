use super::report::safe_wal_text;
use super::*;

const GIB: u64 = 1 << 30;

fn slot(retained: u64) -> SlotInfo {
    SlotInfo {
        plugin: Some("pgoutput".into()),
        slot_type: "logical".into(),
        database: Some("app".into()),
        temporary: false,
        active: true,
        holder: Some(Holder {
            pid: 4242,
            application_name: Some("outbox-relay".into()),
            client_addr: Some("127.0.0.1/32".into()),
            backend_type: Some("walsender".into()),
            user: Some("relay".into()),
        }),
        restart_lsn: Some(Lsn(0x1_0000_0000)),
        confirmed_flush_lsn: Some(Lsn(0x1_0000_1000)),
        lag_bytes: Some(retained.saturating_sub(0x1000)),
        retained_wal_bytes: Some(retained),
        wal_status: Some("reserved".into()),
        safe_wal_size_bytes: None,
        conflicting: Some(false),
        invalidation_reason: None,
        invalidated: false,
    }
}

/// Some line of `text` reads `key` then `value` (any spacing between).
fn has_line(text: &str, key: &str, value: &str) -> bool {
    text.lines().any(|l| {
        l.trim_start()
            .strip_prefix(key)
            .is_some_and(|rest| rest.starts_with(' ') && rest.trim_start().starts_with(value))
    })
}

fn status(slot_info: Option<SlotInfo>) -> SlotStatus {
    SlotStatus {
        server_version_num: 170002,
        server_version: "17.2".into(),
        in_recovery: false,
        database: "app".into(),
        server_wal_lsn: Some(Lsn(0x1_0010_0000)),
        slot_name: "outbox".into(),
        slot: slot_info,
        publication: PublicationInfo {
            name: "outbox_pub".into(),
            exists: true,
            all_tables: false,
            publishes: vec!["insert".into()],
            tables: vec!["public.outbox_events".into()],
        },
        bookmarks: vec![],
        identity: None,
        failover: None,
    }
}

#[test]
fn exit_codes() {
    assert_eq!(exit_code(&status(Some(slot(1024))), GIB), EXIT_OK);
    assert_eq!(exit_code(&status(None), GIB), EXIT_SLOT_MISSING);
    assert_eq!(
        exit_code(&status(Some(slot(2 * GIB))), GIB),
        EXIT_RETAINING_TOO_MUCH
    );
    // Exactly at the threshold is fine; u64::MAX disables the check.
    assert_eq!(exit_code(&status(Some(slot(GIB))), GIB), EXIT_OK);
    assert_eq!(
        exit_code(&status(Some(slot(u64::MAX - 1))), u64::MAX),
        EXIT_OK
    );

    let mut lost = slot(0);
    lost.wal_status = Some("lost".into());
    lost.invalidated = true;
    lost.retained_wal_bytes = None;
    assert_eq!(exit_code(&status(Some(lost)), GIB), EXIT_SLOT_INVALIDATED);

    // Invalidated wins over retaining too much.
    let mut both = slot(10 * GIB);
    both.invalidated = true;
    both.invalidation_reason = Some("wal_removed".into());
    let s = status(Some(both));
    assert_eq!(exit_code(&s, GIB), EXIT_SLOT_INVALIDATED);
    let (_, why) = exit_reason(&s, GIB).unwrap();
    assert!(why.contains("wal_removed"), "{why}");

    assert_eq!(
        [
            EXIT_OK,
            EXIT_SLOT_MISSING,
            EXIT_SLOT_INVALIDATED,
            EXIT_RETAINING_TOO_MUCH
        ],
        [0, 1, 2, 3]
    );
}

#[test]
fn bookmarks_do_not_change_the_exit_code() {
    let mut s = status(Some(slot(1024)));
    s.bookmarks.push(Bookmark {
        name: "before_migration".into(),
        slot_name: "outbox_bookmark_before_migration".into(),
        slot: SlotInfo {
            active: false,
            holder: None,
            ..slot(50 * GIB)
        },
    });
    assert_eq!(exit_code(&s, GIB), EXIT_OK);
}

#[test]
fn exit_reason_names_the_problem() {
    let (code, why) = exit_reason(&status(None), GIB).unwrap();
    assert_eq!(code, 1);
    assert!(why.contains("\"outbox\" does not exist"), "{why}");
    let (code, why) = exit_reason(&status(Some(slot(3 * GIB))), GIB).unwrap();
    assert_eq!(code, 3);
    assert!(why.contains("3.0 GiB") && why.contains("1.0 GiB"), "{why}");
    assert_eq!(exit_reason(&status(Some(slot(1))), GIB), None);
}

#[test]
fn text_report_shows_every_field() {
    let mut s = status(Some(SlotInfo {
        safe_wal_size_bytes: Some(5 * GIB as i64),
        ..slot(3 * 1024 * 1024)
    }));
    s.bookmarks.push(Bookmark {
        name: "nightly".into(),
        slot_name: "outbox_bookmark_nightly".into(),
        slot: SlotInfo {
            active: false,
            holder: None,
            restart_lsn: Some(Lsn(0xA0)),
            ..slot(7 * 1024)
        },
    });
    let text = render_text(&s);
    for needle in [
        "PostgreSQL 17.2 (primary)",
        "WAL at 1/100000",
        "outbox (pgoutput, logical, database app)",
        "pid 4242",
        "application \"outbox-relay\"",
        "from 127.0.0.1/32",
        "3.0 MiB (3145728 bytes)",
        "reserved",
        "outbox_pub (publishes insert): public.outbox_events",
        "NAME",
        "nightly",
        "0/A0",
        "7.0 KiB",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    for (key, value) in [
        ("confirmed_flush", "1/1000"),
        ("restart_lsn", "1/0"),
        ("lag", "3.0 MiB (3141632 bytes)"),
        ("safe WAL left", "5.0 GiB"),
        ("bookmarks", "1"),
        ("wal_status", "reserved"),
    ] {
        assert!(
            has_line(&text, key, value),
            "no line {key} {value} in:\n{text}"
        );
    }
    assert!(!text.contains("INVALIDATED"));
    // The bookmark table's columns line up.
    let table: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("  NAME") || l.starts_with("  nightly"))
        .collect();
    assert_eq!(table.len(), 2, "{text}");
    assert_eq!(
        table[0].find("RESTART_LSN"),
        table[1].find("0/A0"),
        "{text}"
    );
}

#[test]
fn text_report_for_missing_and_invalidated() {
    let mut s = status(None);
    s.publication.exists = false;
    s.publication.tables.clear();
    let text = render_text(&s);
    assert!(text.contains("outbox MISSING"), "{text}");
    assert!(text.contains("outbox_pub MISSING"), "{text}");
    assert!(has_line(&text, "bookmarks", "none"), "{text}");

    let mut lost = slot(0);
    lost.active = false;
    lost.holder = None;
    lost.restart_lsn = None;
    lost.retained_wal_bytes = None;
    lost.wal_status = Some("lost".into());
    lost.invalidation_reason = Some("wal_removed".into());
    lost.invalidated = true;
    let text = render_text(&status(Some(lost)));
    assert!(text.contains("INVALIDATED (wal_removed)"), "{text}");
    assert!(text.contains("nobody (inactive)"), "{text}");
    assert!(has_line(&text, "restart_lsn", "-"), "{text}");
    assert!(!text.contains("unlimited"), "{text}");
}

#[test]
fn safe_wal_size_texts() {
    let unlimited = slot(0);
    assert!(safe_wal_text(&unlimited).starts_with("unlimited"));
    let over = SlotInfo {
        safe_wal_size_bytes: Some(-2048),
        ..slot(0)
    };
    assert_eq!(safe_wal_text(&over), "none (2.0 KiB over the limit)");
}

#[test]
fn json_report_is_stable_for_scripts() {
    let mut s = status(Some(slot(4096)));
    s.bookmarks.push(Bookmark {
        name: "b1".into(),
        slot_name: "outbox_bookmark_b1".into(),
        slot: slot(8192),
    });
    let v: serde_json::Value = serde_json::from_str(&render_json(&s)).unwrap();
    assert_eq!(v["slot_name"], "outbox");
    assert_eq!(v["server_version_num"], 170002);
    assert_eq!(v["server_wal_lsn"], "1/100000");
    assert_eq!(v["slot"]["plugin"], "pgoutput");
    assert_eq!(v["slot"]["active"], true);
    assert_eq!(v["slot"]["holder"]["pid"], 4242);
    assert_eq!(v["slot"]["holder"]["application_name"], "outbox-relay");
    assert_eq!(v["slot"]["confirmed_flush_lsn"], "1/1000");
    assert_eq!(v["slot"]["restart_lsn"], "1/0");
    assert_eq!(v["slot"]["retained_wal_bytes"], 4096);
    assert_eq!(v["slot"]["wal_status"], "reserved");
    assert!(v["slot"]["safe_wal_size_bytes"].is_null());
    assert_eq!(v["slot"]["invalidated"], false);
    assert_eq!(v["publication"]["tables"][0], "public.outbox_events");
    assert_eq!(v["publication"]["publishes"][0], "insert");
    // Bookmarks are flat: name plus the slot fields.
    assert_eq!(v["bookmarks"][0]["name"], "b1");
    assert_eq!(v["bookmarks"][0]["slot_name"], "outbox_bookmark_b1");
    assert_eq!(v["bookmarks"][0]["retained_wal_bytes"], 8192);

    let missing: serde_json::Value = serde_json::from_str(&render_json(&status(None))).unwrap();
    assert!(missing["slot"].is_null());
}

#[test]
fn human_bytes_units() {
    assert_eq!(human_bytes(0), "0 B");
    assert_eq!(human_bytes(1023), "1023 B");
    assert_eq!(human_bytes(1024), "1.0 KiB");
    assert_eq!(human_bytes(1536), "1.5 KiB");
    assert_eq!(human_bytes(16 * 1024 * 1024), "16.0 MiB");
    assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
}

#[test]
fn slot_query_columns_follow_the_server_version() {
    let v15 = slot_query(150008, "true");
    assert!(v15.contains("NULL::bool") && v15.contains("NULL::text"));
    assert!(!v15.contains("s.conflicting") && !v15.contains("s.invalidation_reason"));
    let v16 = slot_query(160004, "true");
    assert!(v16.contains("s.conflicting") && !v16.contains("s.invalidation_reason"));
    let v17 = slot_query(170002, "true");
    assert!(v17.contains("s.conflicting") && v17.contains("s.invalidation_reason"));
}
