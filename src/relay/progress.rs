//! Durable progress outside the slot: bounded duplicates after a crash.
//!
//! A logical slot's confirmed position reaches disk only at checkpoints, so
//! after a PostgreSQL crash (on 16 and older after any restart) it goes back
//! and transactions the broker already acknowledged stream again. The relay
//! therefore also records, in a one-row-per-slot table, the position up to
//! which everything was acknowledged; a session skips the transactions that
//! commit below it instead of producing them again.
//!
//! Safety rules (a wrong skip would lose events, a missed one only repeats):
//! * The record is written only after the acknowledgements it covers (it is
//!   the ack tracker's flush position, the same one sent to PostgreSQL), so
//!   it can be behind the truth, never ahead of it.
//! * It names what it belongs to: slot, database, system identifier and
//!   timeline. A record that does not match the session's server is ignored
//!   (another cluster, a restored backup, a promotion: duplicates, not gaps).
//! * Skipping uses the commit LSN a transaction's Begin announces: a commit
//!   that starts below the recorded position ends at or below it (commit
//!   records do not overlap), so its records were acknowledged.
//!
//! Written with the session's ordinary synchronous commit, at most every
//! [`WRITE_INTERVAL`], and only while records are being acknowledged (a
//! write is WAL too: writing on keepalive progress alone would feed itself).

use std::time::Duration;

use tokio::sync::watch;

use crate::config::{PostgresConfig, TableName};
use crate::lsn::Lsn;
use crate::sql::SqlConnection;

/// The table's name, in the outbox table's schema.
pub const TABLE: &str = "outbox_relay_progress";
/// The writer closes its connection after this long without a write.
const IDLE_CLOSE: Duration = Duration::from_secs(1);
/// Shortest time between two writes of the record.
pub const WRITE_INTERVAL: Duration = Duration::from_millis(25);

/// What the record belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub slot: String,
    pub database: String,
    pub system_id: String,
    pub timeline: u32,
}

/// The qualified table name, in the outbox table's schema.
pub fn table_name(outbox: &TableName) -> String {
    format!(
        "{}.{}",
        crate::config::quote_ident(&outbox.schema),
        crate::config::quote_ident(TABLE)
    )
}

/// `CREATE TABLE IF NOT EXISTS` for the record (also in `sql/04_progress.sql`).
pub fn create_sql(outbox: &TableName) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} ( \
           slot_name text NOT NULL, \
           database text NOT NULL, \
           system_identifier text NOT NULL, \
           timeline integer NOT NULL, \
           acknowledged_lsn pg_lsn NOT NULL, \
           updated_at timestamptz NOT NULL DEFAULT now(), \
           PRIMARY KEY (slot_name, database))",
        table_name(outbox)
    )
}

/// Make sure the table exists; `Err` with the reason when it cannot be made
/// or used (the relay then runs without it and says so once).
pub async fn prepare(client: &SqlConnection, outbox: &TableName) -> Result<(), String> {
    let exists = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table_name(outbox)])
        .await
        .map_err(|e| crate::setup::describe_pg_error(&e))?
        .get::<_, bool>(0);
    if !exists {
        client
            .batch_execute(&create_sql(outbox))
            .await
            .map_err(|e| crate::setup::describe_pg_error(&e))?;
    }
    Ok(())
}

/// The recorded position for `owner`, if one matches it exactly.
pub async fn read(
    client: &SqlConnection,
    outbox: &TableName,
    owner: &Owner,
) -> Result<Option<Lsn>, String> {
    let sql = format!(
        "SELECT acknowledged_lsn::text FROM {} \
         WHERE slot_name = $1 AND database = $2 AND system_identifier = $3 AND timeline = $4",
        table_name(outbox)
    );
    let row = client
        .query_opt(
            &sql,
            &[
                &owner.slot,
                &owner.database,
                &owner.system_id,
                &(owner.timeline as i32),
            ],
        )
        .await
        .map_err(|e| crate::setup::describe_pg_error(&e))?;
    Ok(row.and_then(|r| r.get::<_, String>(0).parse::<Lsn>().ok()))
}

/// The record of `slot` in `database`, whatever server it names: (system
/// identifier, timeline, acknowledged position, when written). `None` without
/// a record or a readable table.
pub async fn read_any(
    client: &SqlConnection,
    outbox: &TableName,
    slot: &str,
    database: &str,
) -> Option<(String, u32, Lsn, std::time::SystemTime)> {
    let sql = format!(
        "SELECT system_identifier, timeline, acknowledged_lsn::text, updated_at \
         FROM {} WHERE slot_name = $1 AND database = $2",
        table_name(outbox)
    );
    let exists = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table_name(outbox)])
        .await
        .ok()?
        .get::<_, bool>(0);
    if !exists {
        return None;
    }
    let row = client.query_opt(&sql, &[&slot, &database]).await.ok()??;
    Some((
        row.get(0),
        u32::try_from(row.get::<_, i32>(1)).ok()?,
        row.get::<_, String>(2).parse().ok()?,
        row.get(3),
    ))
}

/// Writes the latest acknowledged position sent on `positions`, at most every
/// [`WRITE_INTERVAL`], on its own connection. Never moves the record back
/// (`GREATEST`), so a slow write cannot undo a newer one. Ends when the
/// sender is dropped; a failed write is logged and retried with the next value.
pub async fn writer(
    pg: PostgresConfig,
    outbox: TableName,
    owner: Owner,
    mut positions: watch::Receiver<Lsn>,
) {
    let sql = format!(
        "INSERT INTO {t} AS p (slot_name, database, system_identifier, timeline, acknowledged_lsn) \
         VALUES ($1, $2, $3, $4, $5::text::pg_lsn) \
         ON CONFLICT (slot_name, database) DO UPDATE SET \
           system_identifier = EXCLUDED.system_identifier, \
           timeline = EXCLUDED.timeline, \
           acknowledged_lsn = CASE \
             WHEN p.system_identifier = EXCLUDED.system_identifier AND p.timeline = EXCLUDED.timeline \
             THEN greatest(p.acknowledged_lsn, EXCLUDED.acknowledged_lsn) \
             ELSE EXCLUDED.acknowledged_lsn END, \
           updated_at = now()",
        t = table_name(&outbox)
    );
    let mut client: Option<SqlConnection> = None;
    let mut failing = false;
    loop {
        // Idle (nothing acknowledged lately): close the connection, so it
        // never holds a smart shutdown of the server.
        match tokio::time::timeout(IDLE_CLOSE, positions.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                client = None;
                if positions.changed().await.is_err() {
                    return;
                }
            }
        }
        let lsn = *positions.borrow_and_update();
        if client.is_none() {
            client = crate::sql::connect(&pg).await.ok();
        }
        let Some(c) = &client else {
            tokio::time::sleep(WRITE_INTERVAL).await;
            continue;
        };
        let result = c
            .execute(
                &sql,
                &[
                    &owner.slot,
                    &owner.database,
                    &owner.system_id,
                    &(owner.timeline as i32),
                    &lsn.to_string(),
                ],
            )
            .await;
        match result {
            Ok(_) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %crate::setup::describe_pg_error(&e), "cannot record the acknowledged position in the progress table; duplicates after a crash are not bounded until it works again");
                }
                failing = true;
                client = None;
            }
        }
        tokio::time::sleep(WRITE_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lives_beside_the_outbox_table() {
        let t = TableName {
            schema: "app".into(),
            name: "outbox_events".into(),
        };
        assert_eq!(table_name(&t), "app.outbox_relay_progress");
        assert!(create_sql(&t).contains("PRIMARY KEY (slot_name, database)"));
    }
}
