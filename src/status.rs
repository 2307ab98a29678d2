//! `outbox-relay status` and the periodic lag sample: what the server says
//! about our slot, read over an ordinary SQL connection (no streaming).
//!
//! * [`collect`] gathers everything for the `status` command: the slot (plugin,
//!   who holds it, positions, retained WAL, `wal_status`, `safe_wal_size`,
//!   invalidation), the publication and its tables, the server's WAL position,
//!   and the bookmark slots (`<slot>_bookmark_<name>`).
//! * [`render_text`] / [`render_json`] print it; [`exit_code`] turns it into
//!   the command's exit code (see [`EXIT_OK`] and the constants after it).
//! * [`sample_lag`] is the cheap one-query sample the relay takes every few
//!   seconds for the lag and retained-WAL gauges.
//!
//! Works on PostgreSQL 13 and later (`wal_status`, `safe_wal_size`); reads
//! `conflicting` on 16+ and `invalidation_reason` on 17+ after checking
//! `server_version_num`. On a standby the "server WAL position" is the replay
//! position.

use serde::Serialize;
use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, Row};

use crate::lsn::Lsn;

mod bookmarks;
mod report;
pub mod watch;

pub use bookmarks::{sample_bookmarks, BookmarkSample};

pub use report::{
    bookmark_exit_reason, exit_code, exit_reason, human_bytes, render_json, render_text,
};

/// Exit code: the slot exists, is valid, and retains no more than the threshold.
pub const EXIT_OK: i32 = 0;
/// Exit code: the slot does not exist.
pub const EXIT_SLOT_MISSING: i32 = 1;
/// Exit code: the slot is invalidated (`wal_status = 'lost'`, or an
/// invalidation reason / recovery conflict on 16+): it can no longer stream.
pub const EXIT_SLOT_INVALIDATED: i32 = 2;
/// Exit code: the slot retains more WAL than the threshold.
pub const EXIT_RETAINING_TOO_MUCH: i32 = 3;
/// Exit code (opt-in, `--max-bookmark-retained-bytes`): the slot is fine but a
/// bookmark retains more WAL than that threshold. (4 is "server unreadable",
/// 64 an invalid command line or configuration.)
pub const EXIT_BOOKMARK_RETAINING_TOO_MUCH: i32 = 5;

/// Infix of bookmark slot names: `<slot>_bookmark_<name>`.
pub const BOOKMARK_INFIX: &str = "_bookmark_";

/// The server's WAL position: the insert position on a primary, the replay
/// position on a standby (where `pg_current_wal_lsn()` fails).
const WAL_POSITION: &str =
    "(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)";

/// Everything `outbox-relay status` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlotStatus {
    /// `server_version_num`, e.g. 170002.
    pub server_version_num: u32,
    /// `server_version`, e.g. "17.2".
    pub server_version: String,
    /// True on a standby.
    pub in_recovery: bool,
    /// The database the SQL connection is on.
    pub database: String,
    /// Server WAL position when the slot was read.
    #[serde(serialize_with = "ser::opt_lsn")]
    pub server_wal_lsn: Option<Lsn>,
    /// The slot asked for.
    pub slot_name: String,
    /// `None` when the slot does not exist.
    pub slot: Option<SlotInfo>,
    pub publication: PublicationInfo,
    /// Slots named `<slot>_bookmark_<name>`, by name.
    pub bookmarks: Vec<Bookmark>,
    /// The slot's identity: which cluster and timeline it lives on
    /// (`pg_control_system()`, `pg_control_checkpoint()`); the relay stops if
    /// either changes under it without a failover slot. `None` when the role
    /// may not read them.
    pub identity: Option<SlotIdentity>,
    /// Whether a failover would carry the slot over ([`crate::failover`]);
    /// filled in by the `status` command, `None` when not read.
    pub failover: Option<crate::failover::Readiness>,
}

/// The cluster and timeline a slot lives on, and whether it follows a failover.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlotIdentity {
    /// The cluster's system identifier (as `IDENTIFY_SYSTEM` reports it).
    pub system_identifier: String,
    /// Timeline of the latest checkpoint.
    pub timeline: u32,
    /// PostgreSQL 17+: the slot is a failover slot (synchronised to standbys);
    /// `None` before 17 or when the slot is missing.
    pub failover: Option<bool>,
}

/// One replication slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlotInfo {
    /// Output plugin (`pgoutput`); `None` for a physical slot.
    pub plugin: Option<String>,
    /// `logical` or `physical`.
    pub slot_type: String,
    /// Database of a logical slot.
    pub database: Option<String>,
    pub temporary: bool,
    /// Whether a process is streaming from the slot right now.
    pub active: bool,
    /// That process, when active.
    pub holder: Option<Holder>,
    #[serde(serialize_with = "ser::opt_lsn")]
    pub restart_lsn: Option<Lsn>,
    #[serde(serialize_with = "ser::opt_lsn")]
    pub confirmed_flush_lsn: Option<Lsn>,
    /// Server WAL position minus `confirmed_flush_lsn`.
    pub lag_bytes: Option<u64>,
    /// Server WAL position minus `restart_lsn`: WAL kept on disk for the slot.
    pub retained_wal_bytes: Option<u64>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// WAL that can still be written before the slot risks invalidation;
    /// `None` when `max_slot_wal_keep_size = -1` (unlimited) or the slot is lost.
    pub safe_wal_size_bytes: Option<i64>,
    /// PostgreSQL 16+: invalidated by a conflict with recovery.
    pub conflicting: Option<bool>,
    /// PostgreSQL 17+: why the slot was invalidated.
    pub invalidation_reason: Option<String>,
    /// The slot can no longer stream (see [`EXIT_SLOT_INVALIDATED`]).
    pub invalidated: bool,
}

/// The backend holding a slot (from `pg_stat_activity`; fields other than
/// the pid need `pg_read_all_stats` to see another role's sessions).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Holder {
    pub pid: i32,
    pub application_name: Option<String>,
    pub client_addr: Option<String>,
    pub backend_type: Option<String>,
    pub user: Option<String>,
}

/// The publication the relay streams.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PublicationInfo {
    pub name: String,
    pub exists: bool,
    /// `FOR ALL TABLES`.
    pub all_tables: bool,
    /// Which operations it publishes: `insert`, `update`, `delete`, `truncate`.
    pub publishes: Vec<String>,
    /// Published tables as `schema.table` (quoted where needed).
    pub tables: Vec<String>,
}

/// A bookmark slot: a second slot kept at a position to replay from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bookmark {
    /// The `<name>` part.
    pub name: String,
    pub slot_name: String,
    #[serde(flatten)]
    pub slot: SlotInfo,
}

/// The periodic sample behind the lag gauges.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LagSample {
    #[serde(serialize_with = "ser::lsn")]
    pub server_wal_lsn: Lsn,
    #[serde(serialize_with = "ser::opt_lsn")]
    pub confirmed_flush_lsn: Option<Lsn>,
    #[serde(serialize_with = "ser::opt_lsn")]
    pub restart_lsn: Option<Lsn>,
    /// Server WAL position minus `confirmed_flush_lsn` (0 when the slot has none).
    pub lag_bytes: u64,
    /// Server WAL position minus `restart_lsn` (0 when the slot has none, i.e.
    /// it is invalidated: see `wal_status`).
    pub retained_bytes: u64,
    pub wal_status: Option<String>,
    pub safe_wal_size_bytes: Option<i64>,
    pub active: bool,
    /// The backend streaming from the slot; compare with the replication
    /// connection's own backend pid to know whether we hold it.
    pub active_pid: Option<i32>,
}

mod ser {
    use serde::Serializer;

    use crate::lsn::Lsn;

    pub fn lsn<S: Serializer>(lsn: &Lsn, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(lsn)
    }

    pub fn opt_lsn<S: Serializer>(lsn: &Option<Lsn>, s: S) -> Result<S::Ok, S::Error> {
        match lsn {
            Some(l) => s.collect_str(l),
            None => s.serialize_none(),
        }
    }
}

fn lsn(v: Option<PgLsn>) -> Option<Lsn> {
    v.map(|l| Lsn(u64::from(l)))
}

fn diff(to: Option<Lsn>, from: Option<Lsn>) -> Option<u64> {
    Some(to?.0.saturating_sub(from?.0))
}

/// Reads the slot, its bookmarks, the publication and the server position.
pub async fn collect(
    client: &Client,
    slot: &str,
    publication: &str,
) -> Result<SlotStatus, tokio_postgres::Error> {
    let server = client
        .query_one(
            &format!(
                "SELECT current_setting('server_version_num')::int4, current_setting('server_version'), \
                 pg_is_in_recovery(), current_database()::text, {WAL_POSITION}"
            ),
            &[],
        )
        .await?;
    let version_num: i32 = server.get(0);
    let version_num = u32::try_from(version_num).unwrap_or(0);
    let mut server_wal_lsn = lsn(server.get(4));

    let prefix = format!("{slot}{BOOKMARK_INFIX}");
    let rows = client
        .query(
            &slot_query(
                version_num,
                "s.slot_name = $1::text OR starts_with(s.slot_name::text, $2::text)",
            ),
            &[&slot, &prefix],
        )
        .await?;
    let mut main = None;
    let mut bookmarks = Vec::new();
    for row in &rows {
        let (name, wal, info) = slot_info(row);
        if name == slot {
            server_wal_lsn = wal.or(server_wal_lsn);
            main = Some(info);
        } else if let Some(bookmark) = name.strip_prefix(&prefix) {
            bookmarks.push(Bookmark {
                name: bookmark.to_string(),
                slot_name: name.clone(),
                slot: info,
            });
        }
    }

    let identity = slot_identity(client, slot, version_num).await;
    Ok(SlotStatus {
        identity,
        failover: None,
        server_version_num: version_num,
        server_version: server.get(1),
        in_recovery: server.get(2),
        database: server.get(3),
        server_wal_lsn,
        slot_name: slot.to_string(),
        slot: main,
        publication: publication_info(client, publication).await?,
        bookmarks,
    })
}

/// The slot's identity, or `None` when it cannot be read (privileges).
async fn slot_identity(client: &Client, slot: &str, version_num: u32) -> Option<SlotIdentity> {
    let failover = if version_num >= 170000 {
        "(SELECT failover FROM pg_replication_slots WHERE slot_name = $1)"
    } else {
        "(SELECT NULL::bool WHERE $1::text IS NOT NULL)"
    };
    let sql = format!(
        "SELECT (SELECT system_identifier::text FROM pg_control_system()), \
                (SELECT timeline_id FROM pg_control_checkpoint()), {failover}"
    );
    let row = client.query_one(&sql, &[&slot]).await.ok()?;
    Some(SlotIdentity {
        system_identifier: row.get(0),
        timeline: u32::try_from(row.get::<_, i32>(1)).unwrap_or(0),
        failover: row.get(2),
    })
}

/// The slot query for this server version; `filter` uses `s.` for the slot.
fn slot_query(version_num: u32, filter: &str) -> String {
    let conflicting = if version_num >= 160000 {
        "s.conflicting"
    } else {
        "NULL::bool"
    };
    let reason = if version_num >= 170000 {
        "s.invalidation_reason"
    } else {
        "NULL::text"
    };
    format!(
        "SELECT s.slot_name::text, s.plugin::text, s.slot_type, s.database::text, s.temporary, \
         s.active, s.active_pid, s.restart_lsn, s.confirmed_flush_lsn, s.wal_status, \
         s.safe_wal_size, {conflicting}, {reason}, \
         a.application_name, a.client_addr::text, a.backend_type, a.usename::text, \
         {WAL_POSITION} \
         FROM pg_replication_slots s LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid \
         WHERE {filter} ORDER BY s.slot_name"
    )
}

/// (slot name, server WAL position read with it, the rest).
fn slot_info(row: &Row) -> (String, Option<Lsn>, SlotInfo) {
    let name: String = row.get(0);
    let wal = lsn(row.get(17));
    let restart_lsn = lsn(row.get(7));
    let confirmed_flush_lsn = lsn(row.get(8));
    let wal_status: Option<String> = row.get(9);
    let conflicting: Option<bool> = row.get(11);
    let invalidation_reason: Option<String> = row.get(12);
    let active_pid: Option<i32> = row.get(6);
    let invalidated = wal_status.as_deref() == Some("lost")
        || invalidation_reason.is_some()
        || conflicting == Some(true);
    let info = SlotInfo {
        plugin: row.get(1),
        slot_type: row.get(2),
        database: row.get(3),
        temporary: row.get(4),
        active: row.get(5),
        holder: active_pid.map(|pid| Holder {
            pid,
            application_name: row.get(13),
            client_addr: row.get(14),
            backend_type: row.get(15),
            user: row.get(16),
        }),
        restart_lsn,
        confirmed_flush_lsn,
        lag_bytes: diff(wal, confirmed_flush_lsn),
        retained_wal_bytes: diff(wal, restart_lsn),
        wal_status,
        safe_wal_size_bytes: row.get(10),
        conflicting,
        invalidation_reason,
        invalidated,
    };
    (name, wal, info)
}

async fn publication_info(
    client: &Client,
    name: &str,
) -> Result<PublicationInfo, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate \
             FROM pg_publication WHERE pubname = $1::text",
            &[&name],
        )
        .await?;
    let Some(row) = row else {
        return Ok(PublicationInfo {
            name: name.to_string(),
            exists: false,
            all_tables: false,
            publishes: Vec::new(),
            tables: Vec::new(),
        });
    };
    let publishes = ["insert", "update", "delete", "truncate"]
        .iter()
        .enumerate()
        .filter(|(i, _)| row.get::<_, bool>(i + 1))
        .map(|(_, op)| op.to_string())
        .collect();
    let tables = client
        .query(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_publication_tables \
             WHERE pubname = $1::text ORDER BY schemaname, tablename",
            &[&name],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(PublicationInfo {
        name: name.to_string(),
        exists: true,
        all_tables: row.get(0),
        publishes,
        tables,
    })
}

/// One cheap query for the lag gauges; `None` when the slot does not exist.
pub async fn sample_lag(
    client: &Client,
    slot: &str,
) -> Result<Option<LagSample>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            &format!(
                "SELECT {WAL_POSITION}, restart_lsn, confirmed_flush_lsn, wal_status, \
                 safe_wal_size, active, active_pid \
                 FROM pg_replication_slots WHERE slot_name = $1::text"
            ),
            &[&slot],
        )
        .await?;
    Ok(row.map(|row| {
        let wal = lsn(row.get(0));
        let restart_lsn = lsn(row.get(1));
        let confirmed_flush_lsn = lsn(row.get(2));
        LagSample {
            server_wal_lsn: wal.unwrap_or(Lsn::ZERO),
            confirmed_flush_lsn,
            restart_lsn,
            lag_bytes: diff(wal, confirmed_flush_lsn).unwrap_or(0),
            retained_bytes: diff(wal, restart_lsn).unwrap_or(0),
            wal_status: row.get(3),
            safe_wal_size_bytes: row.get(4),
            active: row.get(5),
            active_pid: row.get(6),
        }
    }))
}

#[cfg(test)]
mod tests;
