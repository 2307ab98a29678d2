//! Facts a session reads from PostgreSQL before it streams: the outbox table's
//! OID and the base types of domains (for the mapper), the slot's failover flag
//! (for the identity check) and the walsender's `wal_sender_timeout` (for the
//! silence limit).

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::Client;

use crate::config::TableName;

/// The outbox table's OID: rows are recognised by it, so a rename while the
/// relay runs does not turn the table's inserts into "another table".
pub(super) async fn table_oid(
    client: &Client,
    table: &TableName,
) -> Result<Option<u32>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await?;
    Ok(row.map(|r| r.get::<_, u32>(0)))
}

/// Every domain's OID and the built-in type at the bottom of its chain
/// (a domain over a domain over bytea maps to bytea).
pub(super) async fn domain_base_types(
    client: &Client,
) -> Result<HashMap<u32, u32>, tokio_postgres::Error> {
    let rows = client
        .query(
            "WITH RECURSIVE d(oid, base) AS ( \
                 SELECT oid, typbasetype FROM pg_type WHERE typtype = 'd' \
               UNION ALL \
                 SELECT d.oid, t.typbasetype FROM d JOIN pg_type t ON t.oid = d.base \
                 WHERE t.typtype = 'd') \
             SELECT d.oid, d.base FROM d JOIN pg_type t ON t.oid = d.base WHERE t.typtype <> 'd'",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, u32>(0), r.get::<_, u32>(1)))
        .collect())
}

/// The slot's PostgreSQL 17 `failover` flag: synchronised to standbys, so it
/// survives a promotion. False on older servers and for a missing slot.
pub(super) async fn slot_failover(
    client: &Client,
    slot: &str,
    server_version_num: u32,
) -> Result<bool, tokio_postgres::Error> {
    if server_version_num < 170000 {
        return Ok(false);
    }
    let row = client
        .query_opt(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.is_some_and(|r| r.get::<_, bool>(0)))
}

/// `SHOW wal_sender_timeout` as the walsender prints it (`60s`, `1min`,
/// `500ms`, `0`); `None` for 0 (no timeout) or a value that does not parse.
pub(super) fn parse_wal_sender_timeout(text: &str) -> Option<Duration> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let value: u64 = text[..digits].parse().ok()?;
    let ms = match text[digits..].trim() {
        "ms" => value,
        // A bare number is milliseconds (the setting's unit).
        "" => value,
        "s" => value * 1000,
        "min" => value * 60_000,
        "h" => value * 3_600_000,
        "d" => value * 86_400_000,
        _ => return None,
    };
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// How long the server may stay silent before the connection is presumed
/// dead. A live walsender that is busy (decoding a large transaction of an
/// unpublished table) can send nothing for almost `wal_sender_timeout`: it
/// sends a keepalive only after half of it without a reply read, and drops
/// the connection itself at the full timeout. So wait past that, with a
/// margin; `None` (no timeout on the server) means never presume it dead
/// from silence alone (TCP keepalives still notice a vanished host).
pub fn silence_limit(wal_sender_timeout: Option<Duration>) -> Option<Duration> {
    wal_sender_timeout.map(|t| t + silence_margin(t))
}

/// The margin past `wal_sender_timeout`: a quarter of it, at least 10 s.
fn silence_margin(t: Duration) -> Duration {
    (t / 4).max(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_sender_timeout_text_parses_in_every_unit() {
        let s = Duration::from_secs;
        assert_eq!(parse_wal_sender_timeout("1min"), Some(s(60)));
        assert_eq!(parse_wal_sender_timeout("180s"), Some(s(180)));
        assert_eq!(
            parse_wal_sender_timeout("500ms"),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse_wal_sender_timeout("2h"), Some(s(7200)));
        assert_eq!(parse_wal_sender_timeout("1d"), Some(s(86400)));
        assert_eq!(parse_wal_sender_timeout("0"), None);
        assert_eq!(parse_wal_sender_timeout("soon"), None);
    }

    #[test]
    fn silence_limit_is_never_below_the_servers_timeout() {
        let s = Duration::from_secs;
        assert_eq!(silence_limit(Some(s(60))), Some(s(75)));
        assert_eq!(silence_limit(Some(s(180))), Some(s(225)));
        assert_eq!(silence_limit(Some(s(5))), Some(s(15)));
        assert_eq!(silence_limit(None), None);
    }
}
