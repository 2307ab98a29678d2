//! Judging the catalog facts: pure functions from facts to problems, so every rule
//! can be tested without a server.

use super::catalog::{Facts, PublicationFacts, Rest, ServerFacts, TableFacts};
use super::{SetupError, SlotState};
use crate::config::{format_duration, quote_ident, quote_literal, Config, Problem};

pub(super) fn judge(cfg: &Config, facts: &Facts) -> Vec<Problem> {
    let mut out = Vec::new();
    let server = &facts.server;
    let Some(rest) = &facts.rest else {
        out.push(Problem::new(
            format!("PostgreSQL {} is too old", server.version),
            "upgrade to PostgreSQL 14 or later",
        ));
        return out;
    };
    check_server(cfg, server, &mut out);
    check_table(cfg, rest, &mut out);
    check_role(cfg, server, rest, &mut out);
    check_publication(cfg, server, rest, &mut out);
    check_slot(cfg, server, rest.slot.as_ref(), &mut out);
    out
}

fn check_server(cfg: &Config, s: &ServerFacts, out: &mut Vec<Problem>) {
    if s.wal_level != "logical" {
        out.push(Problem::new(
            format!("wal_level is {}", quote_literal(&s.wal_level)),
            "set wal_level = logical in postgresql.conf and restart PostgreSQL",
        ));
    }
    if s.max_wal_senders == 0 {
        out.push(Problem::new(
            "max_wal_senders is 0, so no replication connection is possible",
            "set max_wal_senders = 10 in postgresql.conf and restart PostgreSQL",
        ));
    } else {
        match s.wal_senders_used {
            // A note, not an error: senders come and go (a restarting relay's
            // old walsender, a replica), and `run` retries SQLSTATE 53300
            // until one is free, saying why (status::watch).
            Some(used) if used >= i64::from(s.max_wal_senders) => out.push(Problem::info(
                format!(
                    "all {} WAL senders (max_wal_senders) are busy right now",
                    s.max_wal_senders
                ),
                "raise max_wal_senders in postgresql.conf and restart PostgreSQL, or stop an \
                 unused replication client; until a sender is free the relay retries \
                 (SQLSTATE 53300) and /readyz says why",
            )),
            Some(_) => {}
            None => out.push(Problem::info(
                "cannot tell whether a WAL sender is free: pg_stat_get_wal_senders() is not readable",
                format!(
                    "check SELECT count(*) FROM pg_stat_get_wal_senders() against max_wal_senders \
                     ({}) as a role that can read it",
                    s.max_wal_senders
                ),
            )),
        }
    }
    if s.max_slot_wal_keep_size_mb == Some(-1) {
        out.push(Problem::info(
            "max_slot_wal_keep_size is -1 (unlimited): while the relay or Kafka is down the \
             slot retains WAL until the server's disk is full",
            "set max_slot_wal_keep_size in postgresql.conf (e.g. WAL rate at peak x 4 hours, \
             below the WAL volume's free space; see docs/deploy.md, Sizing) and reload",
        ));
    }
    if s.max_replication_slots == 0 {
        out.push(Problem::new(
            "max_replication_slots is 0, so no slot can exist",
            "set max_replication_slots = 10 in postgresql.conf and restart PostgreSQL",
        ));
    }
    let timeout_ms = s.wal_sender_timeout_ms;
    let interval = cfg.postgres.status_interval;
    if timeout_ms > 0 && interval.as_millis() * 2 > u128::from(timeout_ms.unsigned_abs()) {
        out.push(Problem::new(
            format!(
                "status_interval ({}) is not well under the server's wal_sender_timeout ({timeout_ms}ms)",
                format_duration(interval)
            ),
            format!("set status_interval below {}ms, e.g. 1s", timeout_ms / 2),
        ));
    }
    if s.in_recovery {
        if s.version_num < 160000 {
            out.push(Problem::new(
                format!(
                    "postgres.url points at a standby, and PostgreSQL {} cannot decode WAL on a standby",
                    s.version
                ),
                "point postgres.url at the primary (decoding on a standby needs PostgreSQL 16+)",
            ));
        } else {
            out.push(Problem::info(
                "postgres.url points at a standby",
                "decoding on a standby needs hot_standby_feedback = on, and the publication must \
                 be created on the primary; prefer the primary",
            ));
        }
    }
}

/// Which setting names a required column, for the fix text.
fn column_setting(cfg: &Config, column: &str) -> &'static str {
    let m = &cfg.mapping;
    if column == m.id_column {
        "id_column / --id-column"
    } else if column == m.key_column {
        "key_column / --key-column"
    } else if m.topic.is_none() && column == m.route_column {
        "route_column / --route-column (or a fixed topic / --topic)"
    } else if column == m.payload_column {
        "payload_column / --payload-column"
    } else if m.type_column.as_deref() == Some(column) {
        "type_column / --type-column (\"\" for none)"
    } else {
        "header_columns / --header-column"
    }
}

fn check_table(cfg: &Config, rest: &Rest, out: &mut Vec<Problem>) {
    let name = &cfg.postgres.table;
    let Some(table) = &rest.table else {
        let hint = match rest.similar_tables.as_slice() {
            [] => String::new(),
            similar => format!(" (tables with similar names: {})", similar.join(", ")),
        };
        out.push(Problem::new(
            format!("table {name} does not exist in this database{hint}"),
            "create it (sql/01_outbox_table.sql) or point table / --table at your outbox table",
        ));
        return;
    };
    if table.relkind != "r" && table.relkind != "p" {
        out.push(Problem::new(
            format!(
                "{name} is not a table (relkind '{}'); logical replication publishes tables only",
                table.relkind
            ),
            "point table / --table at the table the application inserts into",
        ));
        return;
    }
    let required = cfg.mapping.required_columns();
    let actual: Vec<&str> = table.columns.iter().map(|c| c.name.as_str()).collect();
    let missing: Vec<&str> = required
        .iter()
        .copied()
        .filter(|c| !actual.contains(c))
        .collect();
    if !missing.is_empty() {
        let fixes: Vec<String> = missing
            .iter()
            .map(|m| {
                let near = actual
                    .iter()
                    .find(|a| a.eq_ignore_ascii_case(m))
                    .map(|a| format!(" (did you mean {a:?}? names are case-sensitive)"))
                    .unwrap_or_default();
                format!("{m}: {}{near}", column_setting(cfg, m))
            })
            .collect();
        out.push(Problem::new(
            format!(
                "table {name} has no column {} (its columns: {})",
                missing.join(", "),
                actual.join(", ")
            ),
            format!("add the columns, or map yours with {}", fixes.join("; ")),
        ));
    }
    let generated: Vec<&str> = table
        .columns
        .iter()
        .filter(|c| c.generated && required.contains(&c.name.as_str()))
        .map(|c| c.name.as_str())
        .collect();
    if !generated.is_empty() {
        out.push(Problem::new(
            format!(
                "column {} of {name} is generated, and logical replication (PostgreSQL 17 and \
                 older) does not send generated columns",
                generated.join(", ")
            ),
            "make it a regular column set by the application (or a trigger), or map another column",
        ));
    }
}

fn check_role(cfg: &Config, server: &ServerFacts, rest: &Rest, out: &mut Vec<Problem>) {
    let role = quote_ident(&server.user);
    let r = &rest.role;
    if !(r.superuser || r.replication || r.rds_replication) {
        out.push(Problem::new(
            format!(
                "role {role} may not start replication (it has neither REPLICATION nor SUPERUSER)"
            ),
            format!(
                "as a superuser: ALTER ROLE {role} REPLICATION (Amazon RDS: GRANT rds_replication \
                 TO {role}); see sql/03_relay_role.sql"
            ),
        ));
    }
    excess_privileges(cfg, &role, rest, out);
    let name = &cfg.postgres.table;
    if let Some(t) = &rest.table {
        if !t.can_select || !t.schema_usage {
            out.push(Problem::new(
                format!("role {role} cannot read {name}"),
                format!(
                    "GRANT USAGE ON SCHEMA {} TO {role}; GRANT SELECT ON {name} TO {role} (see \
                     sql/03_relay_role.sql)",
                    quote_ident(&name.schema)
                ),
            ));
        }
        if cfg.relay.delete_delivered && !t.owned && !t.writes.iter().any(|w| w == "DELETE") {
            out.push(Problem::new(
                format!(
                    "role {role} cannot DELETE from {name}, which --delete-delivered needs (it \
                     deletes delivered rows by {})",
                    quote_ident(&cfg.mapping.id_column)
                ),
                format!(
                    "GRANT DELETE ON {name} TO {role}, or drop --delete-delivered \
                     (relay.delete_delivered)"
                ),
            ));
        }
    }
}

/// Privileges beyond what the relay needs (LOGIN, REPLICATION, SELECT on the table):
/// notes, since the relay works, but a leaked relay credential would then open more
/// than the outbox.
fn excess_privileges(cfg: &Config, role: &str, rest: &Rest, out: &mut Vec<Problem>) {
    let r = &rest.role;
    let least = "run the relay as a role with only LOGIN, REPLICATION and SELECT on the outbox \
                 table (sql/03_relay_role.sql)";
    if r.superuser {
        out.push(Problem::info(
            format!("role {role} is a superuser: far more than the relay needs"),
            least,
        ));
        return;
    }
    let attributes: Vec<&str> = [
        (r.create_role, "CREATEROLE"),
        (r.create_db, "CREATEDB"),
        (r.bypass_rls, "BYPASSRLS"),
    ]
    .into_iter()
    .filter_map(|(has, name)| has.then_some(name))
    .collect();
    if !attributes.is_empty() {
        out.push(Problem::info(
            format!(
                "role {role} has {}, which the relay does not need",
                attributes.join(", ")
            ),
            format!(
                "as a superuser: ALTER ROLE {role} {}",
                attributes
                    .iter()
                    .map(|a| format!("NO{a}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        ));
    }
    if let Some(t) = &rest.table {
        // --delete-delivered needs DELETE: not an excess then.
        let writes: Vec<String> = t
            .writes
            .iter()
            .filter(|w| !(cfg.relay.delete_delivered && *w == "DELETE"))
            .cloned()
            .collect();
        if !writes.is_empty() {
            let name = &cfg.postgres.table;
            let how = if t.owned {
                format!(
                    "role {role} owns {name}, so it may also {} it; the relay only reads",
                    writes.join(", ")
                )
            } else {
                format!(
                    "role {role} may {} {name}; the relay only reads",
                    writes.join(", ")
                )
            };
            let fix = if t.owned {
                format!(
                    "let another role own the table (the application's), and {least}; the \
                     owner creates the publication once with sql/02_publication.sql"
                )
            } else {
                format!("REVOKE {} ON {name} FROM {role}", writes.join(", "))
            };
            out.push(Problem::info(how, fix));
        }
    }
}

/// What makes an existing publication unusable, as [`super::ensure_publication`]
/// reports it.
pub(super) fn publication_defect(
    cfg: &Config,
    publ: &PublicationFacts,
    table: &TableFacts,
) -> Option<SetupError> {
    let publication = cfg.postgres.publication.clone();
    let t = cfg.postgres.table.clone();
    if table.relkind == "p" && !publ.via_root {
        Some(SetupError::PublicationNotViaRoot {
            publication,
            table: t,
        })
    } else if !publ.has_table {
        Some(SetupError::PublicationLacksTable {
            publication,
            table: t,
        })
    } else if !publ.insert {
        Some(SetupError::PublicationLacksInsert { publication })
    } else {
        None
    }
}

fn check_publication(cfg: &Config, server: &ServerFacts, rest: &Rest, out: &mut Vec<Problem>) {
    let name = &cfg.postgres.table;
    let pub_name = quote_ident(&cfg.postgres.publication);
    let Some(publ) = &rest.publication else {
        if !cfg.postgres.create_publication {
            out.push(Problem::new(
                format!("publication {pub_name} does not exist, and creating it is disabled"),
                "create it with sql/02_publication.sql, or drop --no-create-publication / \
                 create_publication = false",
            ));
        } else if let Some(t) = &rest.table {
            if rest.role.superuser || (rest.role.create_on_database && t.owned) {
                out.push(Problem::info(
                    format!("publication {pub_name} does not exist yet"),
                    format!(
                        "nothing to do: run creates it FOR TABLE {name} WITH (publish = 'insert')"
                    ),
                ));
            } else {
                out.push(Problem::new(
                    format!(
                        "publication {pub_name} does not exist, and role {} cannot create it (that \
                         takes CREATE on database {} and ownership of {name})",
                        quote_ident(&server.user),
                        quote_ident(&server.database)
                    ),
                    "create it once as the table owner with sql/02_publication.sql",
                ));
            }
        }
        return;
    };
    let Some(table) = &rest.table else { return };
    if let Some(defect) = publication_defect(cfg, publ, table) {
        out.push(defect.to_problem());
    } else {
        if let Some(cols) = &publ.columns {
            let unpublished: Vec<&str> = cfg
                .mapping
                .required_columns()
                .into_iter()
                .filter(|c| !cols.iter().any(|p| p == c))
                .collect();
            if !unpublished.is_empty() {
                out.push(Problem::new(
                    format!(
                        "publication {pub_name} has a column list for {name} that leaves out {}",
                        unpublished.join(", ")
                    ),
                    format!("publish every column: ALTER PUBLICATION {pub_name} SET TABLE {name}"),
                ));
            }
        }
        if table.relkind == "p" {
            // publication_defect refuses a partitioned table published otherwise.
            out.push(Problem::info(
                format!(
                    "{name} is partitioned and publication {pub_name} publishes via the \
                     partition root (publish_via_partition_root = true): rows inserted into any \
                     partition, present or future, are relayed as rows of {name}"
                ),
                "nothing to do; old partitions may be detached and dropped once the slot has \
                 passed them",
            ));
        }
        if let Some(filter) = &publ.row_filter {
            out.push(Problem::info(
                format!(
                    "publication {pub_name} filters rows of {name} (WHERE {filter}); rows that do \
                     not match are never relayed"
                ),
                format!("if that is not intended: ALTER PUBLICATION {pub_name} SET TABLE {name}"),
            ));
        }
    }
    if publ.all_tables || publ.others > 0 {
        let scope = if publ.all_tables {
            "is FOR ALL TABLES".to_string()
        } else {
            let shown = i64::try_from(publ.other_names.len()).unwrap_or(i64::MAX);
            let more = if publ.others > shown { ", ..." } else { "" };
            format!(
                "also publishes {} other table(s): {}{more}",
                publ.others,
                publ.other_names.join(", ")
            )
        };
        out.push(Problem::info(
            format!(
                "publication {pub_name} {scope}; their changes are decoded and streamed to the relay too"
            ),
            format!(
                "limit it to the outbox table: ALTER PUBLICATION {pub_name} SET TABLE {name} (or \
                 use a publication of its own)"
            ),
        ));
    }
    if !publ.other_kinds.is_empty() {
        out.push(Problem::info(
            format!(
                "publication {pub_name} also publishes {}; the relay ignores those changes",
                publ.other_kinds.join(", ")
            ),
            format!("ALTER PUBLICATION {pub_name} SET (publish = 'insert') to save decoding work"),
        ));
    }
}

fn check_slot(
    cfg: &Config,
    server: &ServerFacts,
    slot: Option<&SlotState>,
    out: &mut Vec<Problem>,
) {
    let name = &cfg.postgres.slot;
    let lit = quote_literal(name);
    let drop_it = format!("SELECT pg_drop_replication_slot({lit})");
    let Some(s) = slot else {
        if !cfg.postgres.create_slot {
            out.push(Problem::new(
                format!("replication slot {name} does not exist, and creating it is disabled"),
                format!(
                    "create it: SELECT pg_create_logical_replication_slot({lit}, 'pgoutput'), or \
                     drop --no-create-slot / create_slot = false"
                ),
            ));
        } else if server.max_replication_slots > 0
            && server.slots_used >= i64::from(server.max_replication_slots)
        {
            out.push(Problem::new(
                format!(
                    "replication slot {name} does not exist, and all {} replication slots are taken",
                    server.max_replication_slots
                ),
                "raise max_replication_slots in postgresql.conf and restart PostgreSQL, or drop an \
                 unused slot with SELECT pg_drop_replication_slot('name')",
            ));
        } else {
            out.push(Problem::info(
                format!("replication slot {name} does not exist yet"),
                "nothing to do: run creates it (changes committed before that are not relayed)",
            ));
        }
        return;
    };
    if s.slot_type != "logical" {
        out.push(Problem::new(
            format!("slot {name} is a {} slot, not a logical one", s.slot_type),
            "choose another slot name with slot / --slot",
        ));
        return;
    }
    if s.plugin != "pgoutput" {
        out.push(Problem::new(
            format!(
                "slot {name} uses output plugin {:?}, not pgoutput",
                s.plugin
            ),
            format!("choose another slot name with slot / --slot, or drop it if unused: {drop_it}"),
        ));
    }
    if s.database != server.database {
        out.push(Problem::new(
            format!(
                "slot {name} belongs to database {:?}, not {:?}",
                s.database,
                server.database
            ),
            "connect to that database in postgres.url, or choose another slot name with slot / --slot",
        ));
    }
    if s.temporary {
        out.push(Problem::new(
            format!("slot {name} is a temporary slot of another session"),
            "choose another slot name with slot / --slot",
        ));
    }
    if s.invalidated {
        let why = match (&s.invalidation_reason, s.wal_status.as_deref()) {
            (Some(r), _) => format!("invalidation_reason {r}"),
            (None, Some("lost")) => "the WAL it needs was removed (wal_status 'lost')".into(),
            _ => "a conflict with recovery".into(),
        };
        let since = s
            .confirmed_flush_lsn
            .map(|l| format!(" after {l}"))
            .unwrap_or_default();
        out.push(Problem::new(
            format!("slot {name} is invalidated ({why}) and can no longer stream changes"),
            format!(
                "drop it ({drop_it}) and let run create a new one; rows committed{since} until then \
                 were not relayed: re-publish them from the table by id or time, and alert on \
                 retained WAL before max_slot_wal_keep_size is reached"
            ),
        ));
    } else if s.wal_status.as_deref() == Some("unreserved") {
        out.push(Problem::info(
            format!("slot {name} is about to lose WAL it needs (wal_status 'unreserved')"),
            "start the relay now, or raise max_slot_wal_keep_size",
        ));
    }
    if let Some(pid) = s.active_pid {
        let app = s.holder_application_name.as_deref();
        let who = app
            .map(|a| format!(" (application_name {a:?})"))
            .unwrap_or_default();
        let fix = if app == Some(cfg.postgres.application_name.as_str()) {
            format!(
                "another outbox-relay, or a half-open connection of a crashed one, holds it: stop \
                 the other instance; a stale connection ends after wal_sender_timeout, or now with \
                 SELECT pg_terminate_backend({pid})"
            )
        } else {
            format!(
                "stop that client (SELECT pg_terminate_backend({pid})), or choose another slot \
                 name with slot / --slot"
            )
        };
        out.push(Problem::info(
            format!("slot {name} is in use by process {pid}{who}"),
            fix,
        ));
    }
}

#[cfg(test)]
mod tests {
    //! Rules that are hard to reach on a live test server (standby, full slots, old
    //! versions, PostgreSQL 16 recovery conflicts).
    use std::time::Duration;

    use super::super::catalog::{Column, RoleFacts};
    use super::*;
    use crate::config::{KafkaConfig, PostgresConfig, Severity};
    use crate::lsn::Lsn;

    fn cfg() -> Config {
        Config {
            postgres: PostgresConfig {
                url: "postgres://relay@db/app".into(),
                ..Default::default()
            },
            kafka: KafkaConfig {
                brokers: "k:9092".into(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn good() -> Facts {
        let columns = [
            "id",
            "aggregatetype",
            "aggregateid",
            "type",
            "payload",
            "created_at",
        ]
        .map(|n| Column {
            name: n.into(),
            generated: false,
        })
        .into();
        Facts {
            server: ServerFacts {
                version_num: 150004,
                version: "15.4".into(),
                wal_level: "logical".into(),
                max_replication_slots: 10,
                max_wal_senders: 10,
                wal_sender_timeout_ms: 60_000,
                database: "app".into(),
                user: "relay".into(),
                in_recovery: false,
                slots_used: 1,
                wal_senders_used: Some(0),
                max_slot_wal_keep_size_mb: Some(20 * 1024),
            },
            rest: Some(Rest {
                role: RoleFacts {
                    superuser: false,
                    replication: true,
                    rds_replication: false,
                    create_on_database: false,
                    create_role: false,
                    create_db: false,
                    bypass_rls: false,
                },
                table: Some(TableFacts {
                    oid: 1,
                    relkind: "r".into(),
                    owned: false,
                    can_select: true,
                    schema_usage: true,
                    writes: vec![],
                    columns,
                }),
                similar_tables: vec![],
                publication: Some(PublicationFacts {
                    all_tables: false,
                    insert: true,
                    other_kinds: vec![],
                    via_root: false,
                    has_table: true,
                    columns: None,
                    row_filter: None,
                    others: 0,
                    other_names: vec![],
                }),
                slot: Some(SlotState {
                    slot_type: "logical".into(),
                    plugin: "pgoutput".into(),
                    database: "app".into(),
                    temporary: false,
                    active_pid: None,
                    confirmed_flush_lsn: Some(Lsn(0x1_0000_0000)),
                    restart_lsn: Some(Lsn(0x1_0000_0000)),
                    wal_status: Some("reserved".into()),
                    invalidated: false,
                    invalidation_reason: None,
                    holder_application_name: None,
                }),
            }),
        }
    }

    fn rest(f: &mut Facts) -> &mut Rest {
        f.rest.as_mut().unwrap()
    }

    fn texts(cfg: &Config, f: &Facts) -> Vec<String> {
        judge(cfg, f)
            .iter()
            .map(|p| format!("{:?}: {p}", p.severity))
            .collect()
    }

    #[test]
    fn good_facts_have_no_problems() {
        assert_eq!(texts(&cfg(), &good()), Vec::<String>::new());
    }

    #[test]
    fn too_old_stops_early() {
        let mut f = good();
        f.server.version_num = 130011;
        f.server.version = "13.11".into();
        f.rest = None;
        assert_eq!(
            texts(&cfg(), &f),
            ["Error: PostgreSQL 13.11 is too old — fix: upgrade to PostgreSQL 14 or later"]
        );
    }

    #[test]
    fn server_capacity_timeout_and_standby() {
        let mut f = good();
        f.server.wal_senders_used = Some(10);
        f.server.max_replication_slots = 0;
        f.server.wal_sender_timeout_ms = 1500;
        f.server.in_recovery = true;
        let t = texts(&cfg(), &f);
        assert_eq!(t.len(), 4, "{t:#?}");
        assert!(t[0].contains("all 10 WAL senders"));
        assert!(t[1].contains("max_replication_slots is 0"));
        assert!(
            t[2].contains("status_interval (1s) is not well under") && t[2].contains("below 750ms")
        );
        assert!(t[3].starts_with("Error: postgres.url points at a standby"));
        f.server.version_num = 160000;
        assert!(texts(&cfg(), &f)[3].starts_with("Info: postgres.url points at a standby"));
        let mut c = cfg();
        c.postgres.status_interval = Duration::from_millis(500);
        f.server.wal_sender_timeout_ms = 0;
        assert_eq!(texts(&c, &f).len(), 3);
    }

    #[test]
    fn unreadable_wal_senders_and_unlimited_wal_keep_are_notes() {
        let mut f = good();
        f.server.wal_senders_used = None;
        f.server.max_slot_wal_keep_size_mb = Some(-1);
        let t = texts(&cfg(), &f);
        assert_eq!(t.len(), 2, "{t:#?}");
        assert!(t[0].starts_with("Info: cannot tell whether a WAL sender is free"));
        assert!(t[1].starts_with("Info: max_slot_wal_keep_size is -1"));
    }

    #[test]
    fn missing_slot_with_every_slot_taken() {
        let mut f = good();
        rest(&mut f).slot = None;
        f.server.slots_used = 10;
        let t = texts(&cfg(), &f);
        assert_eq!(t.len(), 1);
        assert!(t[0].contains("all 10 replication slots are taken"), "{t:?}");
    }

    #[test]
    fn invalidated_slots_by_version() {
        let mut f = good();
        let slot = rest(&mut f).slot.as_mut().unwrap();
        slot.invalidated = true;
        slot.wal_status = Some("lost".into());
        let t = texts(&cfg(), &f);
        assert!(
            t[0].contains("the WAL it needs was removed") && t[0].contains("after 1/0"),
            "{t:?}"
        );
        let slot = rest(&mut f).slot.as_mut().unwrap();
        slot.wal_status = Some("reserved".into()); // PG16: a recovery conflict
        assert!(texts(&cfg(), &f)[0].contains("a conflict with recovery"));
        rest(&mut f).slot.as_mut().unwrap().invalidation_reason = Some("rows_removed".into());
        assert!(texts(&cfg(), &f)[0].contains("invalidation_reason rows_removed"));
    }

    #[test]
    fn foreign_slots() {
        let mut f = good();
        let slot = rest(&mut f).slot.as_mut().unwrap();
        slot.database = "other".into();
        slot.temporary = true;
        slot.wal_status = Some("unreserved".into());
        let t = texts(&cfg(), &f);
        assert_eq!(t.len(), 3, "{t:#?}");
        assert!(t[0].contains("belongs to database \"other\""));
        assert!(t[1].contains("temporary"));
        assert!(t[2].starts_with("Info:") && t[2].contains("unreserved"));
        rest(&mut f).slot.as_mut().unwrap().slot_type = "physical".into();
        assert!(texts(&cfg(), &f)[0].contains("is a physical slot"));
    }

    #[test]
    fn publication_details() {
        let mut f = good();
        let publ = rest(&mut f).publication.as_mut().unwrap();
        publ.columns = Some(vec![
            "id".into(),
            "aggregatetype".into(),
            "aggregateid".into(),
        ]);
        publ.row_filter = Some("(type <> 'x'::text)".into());
        publ.all_tables = true;
        let t = texts(&cfg(), &f);
        assert_eq!(t.len(), 3, "{t:#?}");
        assert!(t[0].starts_with("Error:") && t[0].contains("leaves out payload, type"));
        assert!(t[1].starts_with("Info:") && t[1].contains("filters rows"));
        assert!(t[2].contains("is FOR ALL TABLES"));
        rest(&mut f).publication.as_mut().unwrap().insert = false;
        assert!(texts(&cfg(), &f)[0].contains("does not publish inserts"));
        let r = rest(&mut f);
        r.table.as_mut().unwrap().relkind = "p".into();
        assert!(texts(&cfg(), &f)[0].contains("publish_via_partition_root = true"));
    }

    #[test]
    fn generated_columns_and_views() {
        let mut f = good();
        rest(&mut f).table.as_mut().unwrap().columns[4].generated = true;
        let t = texts(&cfg(), &f);
        assert!(
            t[0].contains("column payload of public.outbox_events is generated"),
            "{t:?}"
        );
        rest(&mut f).table.as_mut().unwrap().relkind = "v".into();
        assert!(texts(&cfg(), &f)[0].contains("is not a table (relkind 'v')"));
    }

    #[test]
    fn excess_privileges_are_notes() {
        let mut f = good();
        let r = rest(&mut f);
        r.role.create_role = true;
        r.role.bypass_rls = true;
        r.table.as_mut().unwrap().writes = vec!["INSERT".into(), "DELETE".into()];
        let t = texts(&cfg(), &f);
        assert_eq!(
            t,
            [
                "Info: role relay has CREATEROLE, BYPASSRLS, which the relay does not need — \
                 fix: as a superuser: ALTER ROLE relay NOCREATEROLE NOBYPASSRLS",
                "Info: role relay may INSERT, DELETE public.outbox_events; the relay only reads \
                 — fix: REVOKE INSERT, DELETE ON public.outbox_events FROM relay",
            ]
        );
        rest(&mut f).table.as_mut().unwrap().owned = true;
        assert!(texts(&cfg(), &f)[1].contains("owns public.outbox_events"));
        // A superuser: one note, and nothing is missing.
        rest(&mut f).role.superuser = true;
        rest(&mut f).role.replication = false;
        let t = texts(&cfg(), &f);
        assert_eq!(t.len(), 1, "{t:#?}");
        assert!(t[0].starts_with("Info: role relay is a superuser"), "{t:?}");
        assert!(t[0].contains("sql/03_relay_role.sql"));
    }

    #[test]
    fn delete_delivered_names_the_delete_privilege() {
        let mut c = cfg();
        c.relay.delete_delivered = true;
        let mut f = good();
        let t = texts(&c, &f);
        assert_eq!(t.len(), 1, "{t:#?}");
        assert!(
            t[0].starts_with("Error: role relay cannot DELETE from public.outbox_events")
                && t[0].contains("GRANT DELETE ON public.outbox_events TO relay"),
            "{t:?}"
        );
        // Granted: no problem, and DELETE is no excess privilege then.
        rest(&mut f).table.as_mut().unwrap().writes = vec!["DELETE".into()];
        assert_eq!(texts(&c, &f), Vec::<String>::new());
        // Without the flag, DELETE is an excess again.
        assert!(texts(&cfg(), &f)[0].contains("may DELETE"));
    }

    #[test]
    fn a_partitioned_table_says_it_is_published_via_the_root() {
        let mut f = good();
        rest(&mut f).table.as_mut().unwrap().relkind = "p".into();
        rest(&mut f).publication.as_mut().unwrap().via_root = true;
        let t = texts(&cfg(), &f);
        assert_eq!(t.len(), 1, "{t:#?}");
        assert!(
            t[0].starts_with("Info: public.outbox_events is partitioned"),
            "{t:?}"
        );
        assert!(t[0].contains("publishes via the partition root"), "{t:?}");
        rest(&mut f).publication.as_mut().unwrap().via_root = false;
        let t = texts(&cfg(), &f);
        assert!(
            t[0].starts_with("Error:") && t[0].contains("publish_via_partition_root"),
            "{t:?}"
        );
    }

    #[test]
    fn severity_of_notes() {
        let mut f = good();
        rest(&mut f).slot.as_mut().unwrap().active_pid = Some(42);
        let problems = judge(&cfg(), &f);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].severity, Severity::Info);
        assert!(problems[0].what.ends_with("is in use by process 42"));
    }
}
