//! PostgreSQL failover: which server of a multi-host URL to use, and whether
//! the cluster is ready to carry the relay's slot through a failover.
//!
//! * [`ServerRole`], [`sql_role`], [`replication_role`]: libpq's
//!   `target_session_attrs` rules (`in_hot_standby`,
//!   `default_transaction_read_only`). [`crate::sql::connect`] tries the URL's
//!   hosts in order with them; the relay then pins its replication connection
//!   and every later SQL connection to the host chosen, and checks the role
//!   again on the replication connection, so both reach the same server.
//! * [`readiness`]: the `check` / `status` report: the slot's PostgreSQL 17
//!   `failover` flag, `synchronized_standby_slots`, each standby in
//!   `pg_stat_replication` and its physical slot, and, for the other hosts of
//!   the URL, what the standby itself says (`sync_replication_slots`,
//!   `hot_standby_feedback`, `primary_slot_name`, `dbname` in
//!   `primary_conninfo`, the synced copy of the slot). The rules are pure
//!   ([`judge`]).

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::{Config, Problem, SessionAttrs};
use crate::replication::{ReplicationClient, ReplicationError};

/// What `target_session_attrs` looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerRole {
    pub in_hot_standby: bool,
    /// `default_transaction_read_only`.
    pub read_only: bool,
}

impl ServerRole {
    pub fn satisfies(self, attrs: SessionAttrs) -> bool {
        attrs.accepts(self.in_hot_standby, self.read_only)
    }
}

impl std::fmt::Display for ServerRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.in_hot_standby, self.read_only) {
            (true, _) => f.write_str("a standby (in recovery)"),
            (false, true) => f.write_str("read-only (default_transaction_read_only = on)"),
            (false, false) => f.write_str("a read-write primary"),
        }
    }
}

/// The role of the server behind an SQL connection.
pub async fn sql_role(client: &Client) -> Result<ServerRole, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only') = 'on'",
            &[],
        )
        .await?;
    Ok(ServerRole {
        in_hot_standby: row.get(0),
        read_only: row.get(1),
    })
}

/// The role of the server behind a replication connection: PostgreSQL 14+
/// reports both at startup (ParameterStatus); older ones are asked.
pub async fn replication_role(
    repl: &mut ReplicationClient,
) -> Result<ServerRole, ReplicationError> {
    let reported = |repl: &ReplicationClient, name: &str| repl.parameter(name).map(|v| v == "on");
    let in_hot_standby = match reported(repl, "in_hot_standby") {
        Some(v) => v,
        None => first_value(repl.simple_query("SELECT pg_is_in_recovery()").await?) == "t",
    };
    let read_only = match reported(repl, "default_transaction_read_only") {
        Some(v) => v,
        None => {
            first_value(
                repl.simple_query("SHOW default_transaction_read_only")
                    .await?,
            ) == "on"
        }
    };
    Ok(ServerRole {
        in_hot_standby,
        read_only,
    })
}

fn first_value(rows: Vec<Vec<Option<String>>>) -> String {
    rows.into_iter()
        .next()
        .and_then(|r| r.into_iter().next().flatten())
        .unwrap_or_default()
}

/// A walsender of a physical standby, as the primary sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StandbyLink {
    pub application_name: String,
    pub client_addr: Option<String>,
    /// `streaming`, `catchup`, ...
    pub state: String,
    /// The physical slot it streams from, if any.
    pub physical_slot: Option<String>,
}

/// What another host of the URL (a standby) says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StandbyView {
    /// `host:port` as the URL lists it.
    pub host: String,
    /// Why it could not be read, if it could not.
    pub unreadable: Option<String>,
    pub in_recovery: bool,
    pub sync_replication_slots: Option<bool>,
    pub hot_standby_feedback: Option<bool>,
    pub primary_slot_name: Option<String>,
    /// `None` when the role may not read `primary_conninfo`.
    pub primary_conninfo_has_dbname: Option<bool>,
    /// The synced copy of the relay's slot: `None` when it has none.
    pub slot: Option<SyncedSlot>,
}

/// The relay's slot on a standby.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyncedSlot {
    pub synced: bool,
    pub temporary: bool,
    pub confirmed_flush_lsn: Option<String>,
}

/// The failover report for `check` and `status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Readiness {
    pub server_version_num: u32,
    /// PostgreSQL 17+: the slot's `failover` flag; `None` when missing or older.
    pub slot_failover: Option<bool>,
    /// The primary's `synchronized_standby_slots` (17+).
    pub synchronized_standby_slots: Vec<String>,
    pub standbys: Vec<StandbyLink>,
    /// The other hosts of a multi-host URL.
    pub other_hosts: Vec<StandbyView>,
    /// A failover now would carry the slot over (PostgreSQL 17+, a failover
    /// slot, every standby set up for it, and the URL's standbys hold a
    /// persistent synced copy).
    pub ready: bool,
    /// What stands in the way, each with its fix (`Severity::Info`: `run`
    /// proceeds without failover readiness).
    #[serde(serialize_with = "ser_problems")]
    pub findings: Vec<Problem>,
}

fn ser_problems<S: serde::Serializer>(p: &[Problem], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(p.len()))?;
    for problem in p {
        seq.serialize_element(&serde_json::json!({"what": problem.what, "fix": problem.fix}))?;
    }
    seq.end()
}

/// Gathers the facts (the primary over `client`, which reached host number
/// `host` of the URL; the other hosts over their own connections) and judges.
pub async fn readiness(
    cfg: &Config,
    client: &Client,
    host: usize,
) -> Result<Readiness, tokio_postgres::Error> {
    let slot = &cfg.postgres.slot;
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await?
        .get(0);
    let version = u32::try_from(version).unwrap_or(0);
    let mut facts = Readiness {
        server_version_num: version,
        slot_failover: None,
        synchronized_standby_slots: Vec::new(),
        standbys: Vec::new(),
        other_hosts: Vec::new(),
        ready: false,
        findings: Vec::new(),
    };
    if version >= 170000 {
        facts.slot_failover = client
            .query_opt(
                "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
                &[slot],
            )
            .await?
            .map(|r| r.get(0));
        let listed: String = client
            .query_one("SELECT current_setting('synchronized_standby_slots')", &[])
            .await?
            .get(0);
        facts.synchronized_standby_slots = listed
            .split(',')
            .map(|s| s.trim().trim_matches('"').to_string())
            .filter(|s| !s.is_empty())
            .collect();
    }
    // Physical standbys: walsenders that hold no logical slot and are not a
    // base backup in progress.
    let rows = client
        .query(
            "SELECT coalesce(r.application_name::text, ''), r.client_addr::text, coalesce(r.state, ''), \
                    s.slot_name::text \
             FROM pg_stat_replication r \
             LEFT JOIN pg_replication_slots s ON s.active_pid = r.pid \
             WHERE coalesce(s.slot_type, 'physical') = 'physical' \
               AND coalesce(r.state, '') <> 'backup'",
            &[],
        )
        .await?;
    facts.standbys = rows
        .iter()
        .map(|r| StandbyLink {
            application_name: r.get(0),
            client_addr: r.get(1),
            state: r.get(2),
            physical_slot: r.get(3),
        })
        .collect();
    let hosts = cfg.postgres.host_count();
    for other in (0..hosts).filter(|&i| i != host) {
        facts.other_hosts.push(standby_view(cfg, other, slot).await);
    }
    facts.findings = judge(slot, &facts);
    facts.ready = version >= 170000
        && facts.slot_failover == Some(true)
        && !facts.standbys.is_empty()
        && facts.findings.is_empty();
    Ok(facts)
}

async fn standby_view(cfg: &Config, index: usize, slot: &str) -> StandbyView {
    let pinned = cfg.postgres.pinned_to(index);
    let host = pinned
        .replication_connect_config()
        .map(|c| format!("{}:{}", c.host, c.port))
        .unwrap_or_else(|_| format!("host {}", index + 1));
    let mut view = StandbyView {
        host,
        unreadable: None,
        in_recovery: false,
        sync_replication_slots: None,
        hot_standby_feedback: None,
        primary_slot_name: None,
        primary_conninfo_has_dbname: None,
        slot: None,
    };
    let conn = match crate::sql::connect_host(&cfg.postgres, index).await {
        Ok(c) => c,
        Err(e) => {
            view.unreadable = Some(match e {
                crate::sql::SqlConnectError::Postgres(e) => crate::setup::describe_pg_error(&e),
                other => other.to_string(),
            });
            return view;
        }
    };
    let settings = conn
        .query_one(
            "SELECT pg_is_in_recovery(), \
                    current_setting('sync_replication_slots', true), \
                    current_setting('hot_standby_feedback'), \
                    current_setting('primary_slot_name')",
            &[],
        )
        .await;
    match settings {
        Ok(r) => {
            view.in_recovery = r.get(0);
            view.sync_replication_slots = r.get::<_, Option<String>>(1).map(|v| v == "on");
            view.hot_standby_feedback = Some(r.get::<_, String>(2) == "on");
            view.primary_slot_name = Some(r.get::<_, String>(3)).filter(|s| !s.is_empty());
        }
        Err(e) => {
            view.unreadable = Some(crate::setup::describe_pg_error(&e));
            return view;
        }
    }
    // Readable by superusers and pg_read_all_settings only.
    if let Ok(r) = conn
        .query_one("SELECT current_setting('primary_conninfo')", &[])
        .await
    {
        view.primary_conninfo_has_dbname = Some(has_dbname(&r.get::<_, String>(0)));
    }
    let synced = if view.sync_replication_slots.is_some() {
        "synced"
    } else {
        "false"
    };
    if let Ok(row) = conn
        .query_opt(
            &format!(
                "SELECT {synced}, temporary, confirmed_flush_lsn::text \
                 FROM pg_replication_slots WHERE slot_name = $1"
            ),
            &[&slot],
        )
        .await
    {
        view.slot = row.map(|r| SyncedSlot {
            synced: r.get(0),
            temporary: r.get(1),
            confirmed_flush_lsn: r.get(2),
        });
    }
    view
}

/// Whether a conninfo string names a database (slot synchronisation needs one).
fn has_dbname(conninfo: &str) -> bool {
    if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
        let path = conninfo.split('?').next().unwrap_or("");
        let after_host = path.splitn(4, '/').nth(3).unwrap_or("");
        return !after_host.is_empty() || conninfo.contains("dbname=");
    }
    conninfo
        .split_whitespace()
        .any(|kv| kv.trim_start().starts_with("dbname") && kv.contains('='))
}

/// The rules: what would make a failover lose the slot, or stall the relay.
pub fn judge(slot: &str, r: &Readiness) -> Vec<Problem> {
    let mut out = Vec::new();
    if r.server_version_num < 170000 {
        out.push(Problem::info(
            format!(
                "PostgreSQL {} cannot synchronise logical slots to standbys: a failover loses slot {slot:?} (the relay then stops, names the gap and the backfill command)",
                r.server_version_num / 10000
            ),
            "upgrade to PostgreSQL 17 for failover slots; until then, after a failover backfill with `outbox-relay replay --from-time` as the relay's error says (README, High availability)",
        ));
        return out;
    }
    if r.slot_failover == Some(false) {
        out.push(Problem::info(
            format!("slot {slot:?} is not a failover slot: a failover loses it"),
            format!(
                "stop the relay and run over a replication connection: psql \"dbname=DB replication=database\" -c 'ALTER_REPLICATION_SLOT \"{slot}\" (FAILOVER true)' (or drop the slot and let the relay create it without --no-failover-slot)"
            ),
        ));
    }
    if r.standbys.is_empty() {
        out.push(Problem::info(
            "no standby streams from this server: a failover has nowhere to carry the slot",
            "set up a streaming standby with a physical slot (primary_slot_name), sync_replication_slots = on and hot_standby_feedback = on (README, High availability)",
        ));
    }
    if r.synchronized_standby_slots.is_empty() && !r.standbys.is_empty() {
        let physical: Vec<&str> = r
            .standbys
            .iter()
            .filter_map(|s| s.physical_slot.as_deref())
            .collect();
        let value = if physical.is_empty() {
            "STANDBY_SLOT".to_string()
        } else {
            physical.join(",")
        };
        out.push(Problem::info(
            "synchronized_standby_slots is empty: the relay can receive changes a standby has not, and after a failover to that standby the slot there is behind what Kafka already has",
            format!(
                "on the primary: ALTER SYSTEM SET synchronized_standby_slots = '{value}'; SELECT pg_reload_conf();"
            ),
        ));
    }
    for s in &r.standbys {
        let who = match &s.client_addr {
            Some(a) => format!("standby {:?} ({a})", s.application_name),
            None => format!("standby {:?}", s.application_name),
        };
        match &s.physical_slot {
            None => out.push(Problem::info(
                format!("{who} streams without a physical replication slot, so it cannot synchronise failover slots"),
                "create one on the primary (SELECT pg_create_physical_replication_slot('NAME')), set primary_slot_name = 'NAME' on the standby and list NAME in the primary's synchronized_standby_slots",
            )),
            Some(p) if !r.synchronized_standby_slots.is_empty()
                && !r.synchronized_standby_slots.iter().any(|l| l == p) =>
            {
                out.push(Problem::info(
                    format!("{who} streams from physical slot {p:?}, which synchronized_standby_slots does not list: a failover to it may find the slot behind what Kafka has"),
                    format!("add it on the primary: ALTER SYSTEM SET synchronized_standby_slots = '{},{p}'; SELECT pg_reload_conf();", r.synchronized_standby_slots.join(",")),
                ))
            }
            Some(_) => {}
        }
    }
    for listed in &r.synchronized_standby_slots {
        if !r
            .standbys
            .iter()
            .any(|s| s.physical_slot.as_deref() == Some(listed))
        {
            out.push(Problem::info(
                format!("synchronized_standby_slots lists {listed:?}, but no standby streams from it: logical decoding (the relay) waits for that standby"),
                format!("bring that standby back, or remove {listed:?} from synchronized_standby_slots on the primary and reload"),
            ));
        }
    }
    for h in &r.other_hosts {
        let host = &h.host;
        if let Some(why) = &h.unreadable {
            out.push(Problem::info(
                format!("cannot read {host} (another host of postgres.url): {why}"),
                "make sure the standby is up and accepts the relay's role, so its readiness can be checked",
            ));
            continue;
        }
        if !h.in_recovery {
            out.push(Problem::info(
                format!("{host} (another host of postgres.url) is not a standby"),
                "list the primary and its standbys in postgres.url; two primaries are two clusters",
            ));
            continue;
        }
        let mut setting = |ok: bool, what: &str, fix: &str| {
            if !ok {
                out.push(Problem::info(
                    format!("standby {host}: {what}, so a failover to it loses slot {slot:?}"),
                    format!("on {host}: {fix}"),
                ));
            }
        };
        setting(
            h.sync_replication_slots == Some(true),
            "sync_replication_slots is off",
            "ALTER SYSTEM SET sync_replication_slots = on; SELECT pg_reload_conf();",
        );
        setting(
            h.hot_standby_feedback == Some(true),
            "hot_standby_feedback is off",
            "ALTER SYSTEM SET hot_standby_feedback = on; SELECT pg_reload_conf();",
        );
        setting(
            h.primary_slot_name.is_some(),
            "primary_slot_name is not set",
            "create a physical slot on the primary and ALTER SYSTEM SET primary_slot_name = 'NAME'; SELECT pg_reload_conf();",
        );
        setting(
            h.primary_conninfo_has_dbname != Some(false),
            "primary_conninfo names no dbname",
            "add dbname=DB (the relay's database) to primary_conninfo and reload",
        );
        match &h.slot {
            None => setting(
                false,
                "has no synchronised copy of the slot yet",
                "check the settings above and the standby's log; SELECT pg_sync_replication_slots() syncs at once",
            ),
            Some(s) if !s.synced => setting(
                false,
                "has a slot of that name that is not synchronised from the primary",
                "drop that slot on the standby; the synchronised copy replaces it",
            ),
            Some(s) if s.temporary => setting(
                false,
                "holds the slot only as a temporary copy (it is persisted once the primary's slot moves past the standby's position)",
                "let the relay confirm progress (any committed write moves it) or run SELECT pg_sync_replication_slots() once it has",
            ),
            Some(_) => {}
        }
    }
    out
}

/// The report's lines for `status` (text).
pub fn render_text(r: &Readiness) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let verdict = if r.ready {
        "READY: a failover carries the slot over"
    } else {
        "NOT READY: a failover now would lose the slot or stall the relay"
    };
    let _ = writeln!(out, "{:<20} {verdict}", "failover");
    if r.server_version_num >= 170000 {
        let flag = match r.slot_failover {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        let _ = writeln!(out, "{:<20} {flag}", "  failover slot");
        let listed = if r.synchronized_standby_slots.is_empty() {
            "(empty)".to_string()
        } else {
            r.synchronized_standby_slots.join(", ")
        };
        let _ = writeln!(out, "{:<20} {listed}", "  synchronized slots");
    }
    for s in &r.standbys {
        let _ = writeln!(
            out,
            "{:<20} {} {} ({}), physical slot {}",
            "  standby",
            s.application_name,
            s.client_addr.as_deref().unwrap_or("local"),
            s.state,
            s.physical_slot.as_deref().unwrap_or("NONE")
        );
    }
    for p in &r.findings {
        let _ = writeln!(out, "{:<20} {p}", "  warning");
    }
    out
}

#[cfg(test)]
mod tests;
