//! What the catalogs say: the queries of the preflight checks, one fact struct per
//! subject, version differences handled here. No judgement: see `checks`.

use tokio_postgres::Client;

use super::SlotState;
use crate::config::Config;
use crate::lsn::Lsn;

type PgResult<T> = Result<T, tokio_postgres::Error>;

/// Everything the checks look at, gathered up front.
pub(super) struct Facts {
    pub server: ServerFacts,
    /// `None` when the server is too old to look further.
    pub rest: Option<Rest>,
}

pub(super) struct Rest {
    pub role: RoleFacts,
    pub table: Option<TableFacts>,
    /// When the table is missing: tables with similar names, `schema.table`.
    pub similar_tables: Vec<String>,
    pub publication: Option<PublicationFacts>,
    pub slot: Option<SlotState>,
}

impl Facts {
    pub async fn gather(cfg: &Config, client: &Client) -> PgResult<Facts> {
        let server = ServerFacts::query(client).await?;
        if server.version_num < super::MIN_SERVER_VERSION_NUM {
            return Ok(Facts { server, rest: None });
        }
        let table = TableFacts::query(cfg, client).await?;
        let similar_tables = match table {
            Some(_) => Vec::new(),
            None => similar_tables(cfg, client).await?,
        };
        let publication =
            PublicationFacts::query(cfg, client, server.version_num, table.as_ref()).await?;
        let rest = Rest {
            role: RoleFacts::query(client).await?,
            slot: slot_state(client, &cfg.postgres.slot, server.version_num).await?,
            table,
            similar_tables,
            publication,
        };
        Ok(Facts {
            server,
            rest: Some(rest),
        })
    }
}

pub(super) async fn server_version_num(client: &Client) -> PgResult<i32> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await?;
    Ok(row.get(0))
}

pub(super) struct ServerFacts {
    pub version_num: i32,
    pub version: String,
    pub wal_level: String,
    pub max_replication_slots: i32,
    pub max_wal_senders: i32,
    /// Milliseconds; 0 disables the timeout.
    pub wal_sender_timeout_ms: i64,
    pub database: String,
    pub user: String,
    pub in_recovery: bool,
    pub slots_used: i64,
    /// WAL senders running, from `pg_stat_get_wal_senders()` (which lists every
    /// walsender's pid to any role, unlike `pg_stat_activity`, whose
    /// `backend_type` is NULL for other roles' sessions without
    /// `pg_read_all_stats`); `None` when even that cannot be read.
    pub wal_senders_used: Option<i64>,
    /// `max_slot_wal_keep_size` in MB; -1 = unlimited; `None` when unknown.
    pub max_slot_wal_keep_size_mb: Option<i64>,
}

impl ServerFacts {
    async fn query(client: &Client) -> PgResult<Self> {
        let row = client
            .query_one(
                "SELECT current_setting('server_version_num')::int4,
                        current_setting('server_version'),
                        current_setting('wal_level'),
                        current_setting('max_replication_slots')::int4,
                        current_setting('max_wal_senders')::int4,
                        (SELECT setting::int8 FROM pg_settings WHERE name = 'wal_sender_timeout'),
                        current_database()::text,
                        current_user::text,
                        pg_is_in_recovery(),
                        (SELECT count(*) FROM pg_replication_slots),
                        (SELECT setting::int8 FROM pg_settings WHERE name = 'max_slot_wal_keep_size')",
                &[],
            )
            .await?;
        Ok(ServerFacts {
            version_num: row.get(0),
            version: row.get(1),
            wal_level: row.get(2),
            max_replication_slots: row.get(3),
            max_wal_senders: row.get(4),
            wal_sender_timeout_ms: row.get::<_, Option<i64>>(5).unwrap_or(60_000),
            database: row.get(6),
            user: row.get(7),
            in_recovery: row.get(8),
            slots_used: row.get(9),
            max_slot_wal_keep_size_mb: row.get(10),
            wal_senders_used: client
                .query_one("SELECT count(*) FROM pg_stat_get_wal_senders()", &[])
                .await
                .ok()
                .map(|r| r.get(0)),
        })
    }
}

/// The connected role (the same one the replication connection uses).
pub(super) struct RoleFacts {
    pub superuser: bool,
    pub replication: bool,
    /// Amazon RDS grants replication through membership in `rds_replication`.
    pub rds_replication: bool,
    pub create_on_database: bool,
    /// More than the relay needs (`check` says so): CREATEROLE, CREATEDB, BYPASSRLS.
    pub create_role: bool,
    pub create_db: bool,
    pub bypass_rls: bool,
}

impl RoleFacts {
    async fn query(client: &Client) -> PgResult<Self> {
        let row = client
            .query_one(
                "SELECT r.rolsuper, r.rolreplication,
                        EXISTS (SELECT 1 FROM pg_roles m WHERE m.rolname = 'rds_replication'
                                AND pg_has_role(r.oid, m.oid, 'MEMBER')),
                        has_database_privilege(current_database(), 'CREATE'),
                        r.rolcreaterole, r.rolcreatedb, r.rolbypassrls
                 FROM pg_roles r WHERE r.rolname = current_user",
                &[],
            )
            .await?;
        Ok(RoleFacts {
            superuser: row.get(0),
            replication: row.get(1),
            rds_replication: row.get(2),
            create_on_database: row.get(3),
            create_role: row.get(4),
            create_db: row.get(5),
            bypass_rls: row.get(6),
        })
    }
}

pub(super) struct TableFacts {
    pub oid: u32,
    /// `r` table, `p` partitioned table, `v` view, ...
    pub relkind: String,
    /// The connected role owns it (or is a member of its owner).
    pub owned: bool,
    pub can_select: bool,
    pub schema_usage: bool,
    /// Write privileges the role holds on the table (`INSERT`, `UPDATE`, `DELETE`,
    /// `TRUNCATE`), which the relay never uses.
    pub writes: Vec<String>,
    pub columns: Vec<Column>,
}

pub(super) struct Column {
    pub name: String,
    /// A generated column, which pgoutput does not send before PostgreSQL 18.
    pub generated: bool,
}

impl TableFacts {
    pub async fn query(cfg: &Config, client: &Client) -> PgResult<Option<Self>> {
        let t = &cfg.postgres.table;
        let Some(row) = client
            .query_opt(
                "SELECT c.oid, c.relkind::text, pg_has_role(c.relowner, 'USAGE'),
                        has_table_privilege(c.oid, 'SELECT'), has_schema_privilege(n.oid, 'USAGE'),
                        ARRAY(SELECT p FROM unnest(ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) p
                              WHERE has_table_privilege(c.oid, p))
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&t.schema, &t.name],
            )
            .await?
        else {
            return Ok(None);
        };
        let oid: u32 = row.get(0);
        let columns = client
            .query(
                "SELECT attname::text, attgenerated::text <> ''
                 FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped
                 ORDER BY attnum",
                &[&oid],
            )
            .await?
            .iter()
            .map(|r| Column {
                name: r.get(0),
                generated: r.get(1),
            })
            .collect();
        Ok(Some(TableFacts {
            oid,
            relkind: row.get(1),
            owned: row.get(2),
            can_select: row.get(3),
            schema_usage: row.get(4),
            writes: row.get(5),
            columns,
        }))
    }
}

async fn similar_tables(cfg: &Config, client: &Client) -> PgResult<Vec<String>> {
    Ok(client
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p')
               AND n.nspname NOT IN ('pg_catalog', 'information_schema')
               AND (c.relname ILIKE '%outbox%' OR lower(c.relname) = lower($1))
             ORDER BY 1 LIMIT 5",
            &[&cfg.postgres.table.name],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

pub(super) struct PublicationFacts {
    pub all_tables: bool,
    pub insert: bool,
    /// Other operations it publishes: `update`, `delete`, `truncate`.
    pub other_kinds: Vec<&'static str>,
    pub via_root: bool,
    /// `pg_publication_tables` lists the table (under its own name).
    pub has_table: bool,
    /// PostgreSQL 15+: the table's published columns (all of them without a column list).
    pub columns: Option<Vec<String>>,
    /// PostgreSQL 15+: the row filter on the table.
    pub row_filter: Option<String>,
    /// Published tables other than ours and its partitions: how many, and a few.
    pub others: i64,
    pub other_names: Vec<String>,
}

impl PublicationFacts {
    pub async fn query(
        cfg: &Config,
        client: &Client,
        version: i32,
        table: Option<&TableFacts>,
    ) -> PgResult<Option<Self>> {
        let publication = &cfg.postgres.publication;
        let Some(row) = client
            .query_opt(
                "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot
                 FROM pg_publication WHERE pubname = $1",
                &[publication],
            )
            .await?
        else {
            return Ok(None);
        };
        let other_kinds = [(2, "update"), (3, "delete"), (4, "truncate")]
            .into_iter()
            .filter(|&(i, _)| row.get::<_, bool>(i))
            .map(|(_, kind)| kind)
            .collect();
        let t = &cfg.postgres.table;
        // attnames and rowfilter appeared in PostgreSQL 15.
        let member_sql = if version >= 150000 {
            "SELECT attnames::text[], rowfilter FROM pg_publication_tables
             WHERE pubname = $1 AND schemaname = $2 AND tablename = $3"
        } else {
            "SELECT NULL::text[], NULL::text FROM pg_publication_tables
             WHERE pubname = $1 AND schemaname = $2 AND tablename = $3"
        };
        let member = client
            .query_opt(member_sql, &[publication, &t.schema, &t.name])
            .await?;
        let oid = table.map_or(0, |t| t.oid);
        let others = client
            .query_one(
                "SELECT count(*),
                        (array_agg(format('%I.%I', pt.schemaname, pt.tablename)
                                   ORDER BY pt.schemaname, pt.tablename))[1:5]
                 FROM pg_publication_tables pt
                 JOIN pg_namespace n ON n.nspname = pt.schemaname
                 JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
                 WHERE pt.pubname = $1 AND c.oid <> $2
                   AND c.oid NOT IN (SELECT relid FROM pg_partition_tree($2::oid::regclass))",
                &[publication, &oid],
            )
            .await?;
        Ok(Some(PublicationFacts {
            all_tables: row.get(0),
            insert: row.get(1),
            other_kinds,
            via_root: row.get(5),
            has_table: member.is_some(),
            columns: member.as_ref().and_then(|m| m.get(0)),
            row_filter: member.as_ref().and_then(|m| m.get(1)),
            others: others.get(0),
            other_names: others.get::<_, Option<Vec<String>>>(1).unwrap_or_default(),
        }))
    }
}

/// `pg_replication_slots` for one slot, joined to its holder in `pg_stat_activity`
/// (whose `application_name` every role may read).
pub(super) async fn slot_state(
    client: &Client,
    slot: &str,
    version: i32,
) -> PgResult<Option<SlotState>> {
    let conflicting = if version >= 160000 {
        "s.conflicting"
    } else {
        "NULL::bool"
    };
    let reason = if version >= 170000 {
        "s.invalidation_reason"
    } else {
        "NULL::text"
    };
    let sql = format!(
        "SELECT s.slot_type, s.plugin::text, s.database::text, s.temporary, s.active_pid,
                s.confirmed_flush_lsn::text, s.restart_lsn::text, s.wal_status,
                {conflicting}, {reason}, a.application_name
         FROM pg_replication_slots s LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid
         WHERE s.slot_name = $1"
    );
    let Some(row) = client.query_opt(&sql, &[&slot]).await? else {
        return Ok(None);
    };
    // PostgreSQL prints pg_lsn as X/X, which Lsn parses; anything else reads as unknown.
    let lsn = |i: usize| {
        row.get::<_, Option<String>>(i)
            .and_then(|t| t.parse::<Lsn>().ok())
    };
    let wal_status: Option<String> = row.get(7);
    let conflicting: Option<bool> = row.get(8);
    let invalidation_reason: Option<String> = row.get(9);
    Ok(Some(SlotState {
        slot_type: row.get(0),
        plugin: row.get::<_, Option<String>>(1).unwrap_or_default(),
        database: row.get::<_, Option<String>>(2).unwrap_or_default(),
        temporary: row.get(3),
        active_pid: row.get(4),
        confirmed_flush_lsn: lsn(5),
        restart_lsn: lsn(6),
        invalidated: wal_status.as_deref() == Some("lost")
            || conflicting == Some(true)
            || invalidation_reason.is_some(),
        wal_status,
        invalidation_reason,
        holder_application_name: row.get::<_, Option<String>>(10).filter(|a| !a.is_empty()),
    }))
}
