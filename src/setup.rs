//! Preflight checks and setup over an ordinary SQL connection: are this server, role,
//! table, publication and slot fit for the relay? Each finding names its fix.
//!
//! Slots are not created here: that goes through the replication protocol
//! (`CREATE_REPLICATION_SLOT`, see [`crate::replication`]). Nothing here alters an
//! existing publication either: it may be someone else's.
//!
//! Catalog columns differ by version: `pg_publication_tables.attnames`/`rowfilter`
//! are PostgreSQL 15+, `pg_replication_slots.conflicting` 16+ and
//! `invalidation_reason` 17+; queries are built from `server_version_num`.

use std::fmt::Write as _;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::config::{quote_ident, Config, TableName};
pub use crate::config::{Problem, Severity};
use crate::lsn::Lsn;

mod catalog;
mod checks;
mod kafka;

pub use kafka::diagnose_kafka;

use catalog::{PublicationFacts, TableFacts};

/// PostgreSQL 14: the oldest release the relay supports.
pub const MIN_SERVER_VERSION_NUM: i32 = 140000;

/// A replication slot as `pg_replication_slots` shows it, with the holder's
/// `application_name` from `pg_stat_activity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    /// `logical` or `physical`.
    pub slot_type: String,
    /// Output plugin; empty for a physical slot.
    pub plugin: String,
    /// Database of a logical slot; empty for a physical one.
    pub database: String,
    pub temporary: bool,
    /// The backend streaming from it now, if any.
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// It can no longer stream: WAL removed (`wal_status = 'lost'`), a recovery
    /// conflict (PostgreSQL 16+ `conflicting`) or any PostgreSQL 17 `invalidation_reason`.
    pub invalidated: bool,
    /// PostgreSQL 17+ (`wal_removed`, `rows_removed`, `wal_level_insufficient`, ...).
    pub invalidation_reason: Option<String>,
    pub holder_application_name: Option<String>,
}

/// Why [`ensure_publication`] could not make the publication usable. Only a lost
/// connection is worth a retry ([`SetupError::is_transient`]); the rest need an
/// operator, and [`SetupError::to_problem`] says what to do.
#[derive(Debug)]
pub enum SetupError {
    Postgres(tokio_postgres::Error),
    TableMissing {
        table: TableName,
    },
    PublicationMissing {
        publication: String,
    },
    PublicationLacksTable {
        publication: String,
        table: TableName,
    },
    PublicationLacksInsert {
        publication: String,
    },
    PublicationNotViaRoot {
        publication: String,
        table: TableName,
    },
    CreatePublication {
        publication: String,
        table: TableName,
        source: tokio_postgres::Error,
    },
}

impl SetupError {
    /// A lost connection or a server shutting down, overloaded or between restarts:
    /// retry. Everything else (missing objects, privileges) needs an operator.
    pub fn is_transient(&self) -> bool {
        match self {
            SetupError::Postgres(e) | SetupError::CreatePublication { source: e, .. } => {
                is_transient_pg_error(e)
            }
            _ => false,
        }
    }

    /// The finding and its fix, as `check` shows them.
    pub fn to_problem(&self) -> Problem {
        let p = |publication: &str| quote_ident(publication).into_owned();
        match self {
            SetupError::Postgres(e) => Problem::new(
                format!("a PostgreSQL query failed: {}", describe_pg_error(e)),
                "check the connection and the server log",
            ),
            SetupError::TableMissing { table } => Problem::new(
                format!("table {table} does not exist"),
                "create it (sql/01_outbox_table.sql) or point table / --table at your outbox table",
            ),
            SetupError::PublicationMissing { publication } => Problem::new(
                format!("publication {} does not exist, and creating it is disabled", p(publication)),
                "create it with sql/02_publication.sql, or drop --no-create-publication / create_publication = false",
            ),
            SetupError::PublicationLacksTable { publication, table } => Problem::new(
                format!("publication {} does not include {table}", p(publication)),
                format!(
                    "the relay does not alter an existing publication: run ALTER PUBLICATION {} ADD TABLE {table} \
                     as the table owner, or choose another publication",
                    p(publication)
                ),
            ),
            SetupError::PublicationLacksInsert { publication } => Problem::new(
                format!("publication {} does not publish inserts", p(publication)),
                format!("ALTER PUBLICATION {} SET (publish = 'insert')", p(publication)),
            ),
            SetupError::PublicationNotViaRoot { publication, table } => Problem::new(
                format!("publication {} publishes the partitions of {table} under their own names", p(publication)),
                format!("ALTER PUBLICATION {} SET (publish_via_partition_root = true)", p(publication)),
            ),
            SetupError::CreatePublication { publication, table, source } => Problem::new(
                format!("cannot create publication {} for {table}: {}", p(publication), describe_pg_error(source)),
                "create it once as the table owner with sql/02_publication.sql",
            ),
        }
    }
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = self.to_problem();
        write!(f, "{}; {}", p.what, p.fix)
    }
}

impl std::error::Error for SetupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SetupError::Postgres(e) | SetupError::CreatePublication { source: e, .. } => Some(e),
            _ => None,
        }
    }
}

impl From<tokio_postgres::Error> for SetupError {
    fn from(e: tokio_postgres::Error) -> Self {
        SetupError::Postgres(e)
    }
}

/// Without a SQLSTATE: a closed connection, an I/O error or a timeout (not a client
/// bug such as a type mismatch). With one: connection exception (08), insufficient
/// resources (53), operator intervention (57P01-57P03, 57P05; not 57P04 database
/// dropped), system error (58), serialization failure or deadlock.
fn is_transient_pg_error(e: &tokio_postgres::Error) -> bool {
    match e.code().map(|c| c.code()) {
        // tokio_postgres exposes no error kind; its timeout error has no source and
        // reads "timeout waiting for server".
        None => {
            e.is_closed()
                || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
                || e.to_string().starts_with("timeout")
        }
        Some(code) => {
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("58")
                || (code.starts_with("57P") && code != "57P04")
                || code == "40001"
                || code == "40P01"
        }
    }
}

/// `tokio_postgres::Error`'s Display is only "db error"; show the server's message.
pub fn describe_pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        ),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// What stops the relay from running: the `Severity::Error` findings only (an
/// empty list means go). `run` calls this before its first session.
pub async fn preflight(
    cfg: &Config,
    client: &Client,
) -> Result<Vec<Problem>, tokio_postgres::Error> {
    let mut problems = diagnose(cfg, client).await?;
    problems.retain(Problem::is_error);
    Ok(problems)
}

/// Everything `check` reports: what stops the relay ([`preflight`]) and the notes
/// worth knowing (`Severity::Info`: the slot is held by another process right now,
/// the publication will be created, it also publishes other tables, ...).
pub async fn diagnose(
    cfg: &Config,
    client: &Client,
) -> Result<Vec<Problem>, tokio_postgres::Error> {
    let facts = catalog::Facts::gather(cfg, client).await?;
    Ok(checks::judge(cfg, &facts))
}

/// The slot named in `cfg`, if it exists.
pub async fn slot_state(
    cfg: &Config,
    client: &Client,
) -> Result<Option<SlotState>, tokio_postgres::Error> {
    let version = catalog::server_version_num(client).await?;
    catalog::slot_state(client, &cfg.postgres.slot, version).await
}

/// Makes sure the publication exists and covers the table: creates it
/// (`FOR TABLE t WITH (publish = 'insert')`) when missing and allowed; an existing one
/// that lacks the table, inserts or (for a partitioned table) the partition root is an
/// error, never altered.
pub async fn ensure_publication(cfg: &Config, client: &Client) -> Result<(), SetupError> {
    let version = catalog::server_version_num(client).await?;
    let table = TableFacts::query(cfg, client)
        .await?
        .ok_or_else(|| SetupError::TableMissing {
            table: cfg.postgres.table.clone(),
        })?;
    let publication = &cfg.postgres.publication;
    if let Some(publ) = PublicationFacts::query(cfg, client, version, Some(&table)).await? {
        return usable(cfg, &publ, &table);
    }
    if !cfg.postgres.create_publication {
        return Err(SetupError::PublicationMissing {
            publication: publication.clone(),
        });
    }
    let via_root = if table.relkind == "p" {
        ", publish_via_partition_root = true"
    } else {
        ""
    };
    let sql = format!(
        "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert'{via_root})",
        quote_ident(publication),
        cfg.postgres.table
    );
    match client.batch_execute(&sql).await {
        Ok(()) => Ok(()),
        // Another instance created it at the same moment: judge theirs.
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => {
            match PublicationFacts::query(cfg, client, version, Some(&table)).await? {
                Some(publ) => usable(cfg, &publ, &table),
                None => Err(SetupError::CreatePublication {
                    publication: publication.clone(),
                    table: cfg.postgres.table.clone(),
                    source: e,
                }),
            }
        }
        Err(e) => Err(SetupError::CreatePublication {
            publication: publication.clone(),
            table: cfg.postgres.table.clone(),
            source: e,
        }),
    }
}

fn usable(cfg: &Config, publ: &PublicationFacts, table: &TableFacts) -> Result<(), SetupError> {
    match checks::publication_defect(cfg, publ, table) {
        Some(defect) => Err(defect),
        None => Ok(()),
    }
}

/// The `check` command's report: errors first, then notes, then a count.
pub fn render_problems(problems: &[Problem]) -> String {
    if problems.is_empty() {
        return "no problems found\n".to_string();
    }
    let mut sorted: Vec<&Problem> = problems.iter().collect();
    sorted.sort_by_key(|p| p.severity);
    let mut s = String::new();
    for p in &sorted {
        let label = match p.severity {
            Severity::Error => "problem",
            Severity::Info => "note",
        };
        let _ = writeln!(s, "{label}: {}\n    fix: {}", p.what, p.fix);
    }
    let errors = problems.iter().filter(|p| p.is_error()).count();
    let notes = problems.len() - errors;
    let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    let _ = writeln!(
        s,
        "{}, {}",
        plural(errors, "problem"),
        plural(notes, "note")
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_errors_first_and_counts() {
        let problems = [
            Problem::info("slot s does not exist yet", "nothing to do"),
            Problem::new(
                "wal_level is 'replica'",
                "set wal_level = logical in postgresql.conf and restart PostgreSQL",
            ),
        ];
        assert_eq!(
            render_problems(&problems),
            "problem: wal_level is 'replica'\n    fix: set wal_level = logical in postgresql.conf and restart PostgreSQL\n\
             note: slot s does not exist yet\n    fix: nothing to do\n\
             1 problem, 1 note\n"
        );
        assert_eq!(render_problems(&[]), "no problems found\n");
    }

    #[test]
    fn setup_errors_name_the_fix() {
        let e = SetupError::PublicationLacksTable {
            publication: "Pub".into(),
            table: TableName::new("public", "outbox_events"),
        };
        assert_eq!(
            e.to_string(),
            "publication \"Pub\" does not include public.outbox_events; the relay does not alter an existing \
             publication: run ALTER PUBLICATION \"Pub\" ADD TABLE public.outbox_events as the table owner, or \
             choose another publication"
        );
    }
}
