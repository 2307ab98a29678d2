//! The `status` report: exit code, human text, JSON.

use std::fmt::Write as _;

use super::{
    Bookmark, SlotInfo, SlotStatus, EXIT_OK, EXIT_RETAINING_TOO_MUCH, EXIT_SLOT_INVALIDATED,
    EXIT_SLOT_MISSING,
};
use crate::lsn::Lsn;

/// The exit code of `outbox-relay status`, first match wins:
/// [`EXIT_SLOT_MISSING`] (1), [`EXIT_SLOT_INVALIDATED`] (2),
/// [`EXIT_RETAINING_TOO_MUCH`] (3, retained WAL strictly above
/// `max_retained_bytes`; pass `u64::MAX` to disable), else [`EXIT_OK`] (0).
/// Bookmark slots are reported but do not change the code: they retain WAL
/// on purpose.
pub fn exit_code(status: &SlotStatus, max_retained_bytes: u64) -> i32 {
    match exit_reason(status, max_retained_bytes) {
        Some((code, _)) => code,
        None => EXIT_OK,
    }
}

/// Why [`exit_code`] is not 0, as (code, one sentence); `None` when it is.
pub fn exit_reason(status: &SlotStatus, max_retained_bytes: u64) -> Option<(i32, String)> {
    let name = &status.slot_name;
    let Some(slot) = &status.slot else {
        return Some((
            EXIT_SLOT_MISSING,
            format!("replication slot {name:?} does not exist"),
        ));
    };
    if slot.invalidated {
        return Some((
            EXIT_SLOT_INVALIDATED,
            format!(
                "replication slot {name:?} is invalidated ({}); drop it and let the relay create a new one",
                invalidation_text(slot)
            ),
        ));
    }
    match slot.retained_wal_bytes {
        Some(retained) if retained > max_retained_bytes => Some((
            EXIT_RETAINING_TOO_MUCH,
            format!(
                "replication slot {name:?} retains {} of WAL, more than the limit of {}",
                human_bytes(retained),
                human_bytes(max_retained_bytes)
            ),
        )),
        _ => None,
    }
}

/// The opt-in bookmark check of `status`: (code 5, one sentence) when a
/// bookmark retains more WAL than `max_bookmark_retained_bytes`, naming the
/// largest. Consulted only when [`exit_reason`] is `None`.
pub fn bookmark_exit_reason(
    status: &SlotStatus,
    max_bookmark_retained_bytes: u64,
) -> Option<(i32, String)> {
    let over: Vec<_> = status
        .bookmarks
        .iter()
        .filter_map(|b| Some((b, b.slot.retained_wal_bytes?)))
        .filter(|(_, r)| *r > max_bookmark_retained_bytes)
        .collect();
    let (worst, retained) = over.iter().max_by_key(|(_, r)| *r)?;
    Some((
        super::EXIT_BOOKMARK_RETAINING_TOO_MUCH,
        format!(
            "{} bookmark(s) retain more WAL than the limit of {}; the largest, {:?}, retains {}: replay it or drop it (outbox-relay bookmark drop {})",
            over.len(),
            human_bytes(max_bookmark_retained_bytes),
            worst.name,
            human_bytes(*retained),
            worst.name
        ),
    ))
}

fn invalidation_text(slot: &SlotInfo) -> String {
    if let Some(reason) = &slot.invalidation_reason {
        return reason.clone();
    }
    if slot.conflicting == Some(true) {
        return "conflict with recovery".to_string();
    }
    match &slot.wal_status {
        Some(s) => format!("wal_status {s}"),
        None => "unknown reason".to_string(),
    }
}

/// `status` as pretty JSON (field names as in [`SlotStatus`]; LSNs as `X/X`
/// text; absent values as `null`).
pub fn render_json(status: &SlotStatus) -> String {
    serde_json::to_string_pretty(status).expect("SlotStatus serializes: plain data, string keys")
}

/// `status` as a human-readable report.
pub fn render_text(status: &SlotStatus) -> String {
    let mut out = String::new();
    let mut line = |key: &str, value: String| {
        let _ = writeln!(out, "{key:<20} {value}");
    };
    line(
        "server",
        format!(
            "PostgreSQL {} ({}), database {}, WAL at {}",
            status.server_version,
            if status.in_recovery {
                "standby"
            } else {
                "primary"
            },
            status.database,
            opt_lsn_text(status.server_wal_lsn)
        ),
    );
    match &status.slot {
        None => line("slot", format!("{} MISSING", status.slot_name)),
        Some(slot) => {
            line(
                "slot",
                format!(
                    "{} ({}, {}{}){}",
                    status.slot_name,
                    slot.plugin.as_deref().unwrap_or("no plugin"),
                    slot.slot_type,
                    slot.database
                        .as_deref()
                        .map(|d| format!(", database {d}"))
                        .unwrap_or_default(),
                    if slot.temporary { " temporary" } else { "" }
                ),
            );
            if slot.invalidated {
                line(
                    "  state",
                    format!("INVALIDATED ({})", invalidation_text(slot)),
                );
            }
            line("  held by", holder_text(slot));
            line("  confirmed_flush", opt_lsn_text(slot.confirmed_flush_lsn));
            line("  restart_lsn", opt_lsn_text(slot.restart_lsn));
            line("  lag", opt_bytes_text(slot.lag_bytes));
            line("  retained WAL", opt_bytes_text(slot.retained_wal_bytes));
            line(
                "  wal_status",
                slot.wal_status.clone().unwrap_or_else(|| "-".into()),
            );
            line("  safe WAL left", safe_wal_text(slot));
        }
    }
    let p = &status.publication;
    if p.exists {
        let tables = if p.all_tables {
            "all tables".to_string()
        } else if p.tables.is_empty() {
            "no tables".to_string()
        } else {
            p.tables.join(", ")
        };
        line(
            "publication",
            format!(
                "{} (publishes {}): {tables}",
                p.name,
                list_or_none(&p.publishes)
            ),
        );
    } else {
        line("publication", format!("{} MISSING", p.name));
    }
    if let Some(f) = &status.failover {
        out.push_str(&crate::failover::render_text(f));
    }
    let mut line = |key: &str, value: String| {
        let _ = writeln!(out, "{key:<20} {value}");
    };
    if status.bookmarks.is_empty() {
        line("bookmarks", "none".into());
    } else {
        line("bookmarks", status.bookmarks.len().to_string());
        out.push_str(&bookmark_table(&status.bookmarks));
    }
    out
}

fn bookmark_table(bookmarks: &[Bookmark]) -> String {
    let header = [
        "NAME",
        "RESTART_LSN",
        "CONFIRMED_FLUSH",
        "RETAINED",
        "WAL_STATUS",
        "ACTIVE",
    ];
    let rows: Vec<[String; 6]> = bookmarks
        .iter()
        .map(|b| {
            [
                b.name.clone(),
                opt_lsn_text(b.slot.restart_lsn),
                opt_lsn_text(b.slot.confirmed_flush_lsn),
                b.slot
                    .retained_wal_bytes
                    .map(human_bytes)
                    .unwrap_or_else(|| "-".into()),
                if b.slot.invalidated {
                    "INVALIDATED".to_string()
                } else {
                    b.slot.wal_status.clone().unwrap_or_else(|| "-".into())
                },
                if b.slot.active { "yes" } else { "no" }.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut emit = |cells: &[&str]| {
        let mut l = String::from("  ");
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    emit(&header);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        emit(&cells);
    }
    out
}

fn holder_text(slot: &SlotInfo) -> String {
    match (&slot.holder, slot.active) {
        (Some(h), _) => {
            let mut s = format!("pid {}", h.pid);
            if let Some(app) = h.application_name.as_deref().filter(|a| !a.is_empty()) {
                let _ = write!(s, ", application {app:?}");
            }
            if let Some(addr) = &h.client_addr {
                let _ = write!(s, ", from {addr}");
            }
            if let Some(user) = &h.user {
                let _ = write!(s, ", user {user}");
            }
            s
        }
        (None, true) => "an unknown process".to_string(),
        (None, false) => "nobody (inactive)".to_string(),
    }
}

pub(super) fn safe_wal_text(slot: &SlotInfo) -> String {
    match slot.safe_wal_size_bytes {
        Some(b) if b < 0 => format!("none ({} over the limit)", human_bytes(b.unsigned_abs())),
        Some(b) => human_bytes(b as u64),
        None if slot.invalidated => "-".to_string(),
        None => "unlimited (max_slot_wal_keep_size = -1)".to_string(),
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "nothing".to_string()
    } else {
        items.join(", ")
    }
}

fn opt_lsn_text(lsn: Option<Lsn>) -> String {
    lsn.map(|l| l.to_string()).unwrap_or_else(|| "-".into())
}

fn opt_bytes_text(bytes: Option<u64>) -> String {
    match bytes {
        Some(b) => format!("{} ({b} bytes)", human_bytes(b)),
        None => "-".to_string(),
    }
}

/// `1536` → `1.5 KiB`; exact below 1 KiB.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}
