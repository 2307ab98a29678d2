//! Text of the replication commands and parsing of their result rows. Pure.
//!
//! Walsender grammar: keywords UPPERCASE, slot and option names as quoted
//! identifiers, option values as single-quoted strings, LSNs as `X/X`.

use super::{CreatedSlot, IdentifySystem, ReplicationError};
use crate::lsn::Lsn;

/// NAMEDATALEN - 1.
const MAX_SLOT_NAME_LEN: usize = 63;

/// PostgreSQL's own rule for slot names (`ReplicationSlotValidateName`):
/// lower-case letters, digits and underscores, at most 63 bytes.
pub(crate) fn validate_slot_name(name: &str) -> Result<(), ReplicationError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_SLOT_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(ReplicationError::InvalidSlotName(name.to_string()))
    }
}

/// `"ident"`, with `"` doubled.
pub(crate) fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// `'value'`, with `'` doubled. The walsender lexer has no backslash escapes
/// in these strings, so doubling is the only escaping needed.
pub(crate) fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// `CREATE_REPLICATION_SLOT "slot" LOGICAL pgoutput ...` without exporting a
/// snapshot: the new option syntax on PG15+, the old keyword before.
pub(crate) fn create_logical_slot(
    slot: &str,
    server_version_num: u32,
    failover: bool,
) -> Result<String, ReplicationError> {
    validate_slot_name(slot)?;
    // PostgreSQL 17: `FAILOVER [ boolean ]` among the parenthesised options.
    let snapshot = if server_version_num >= 170_000 && failover {
        "(SNAPSHOT 'nothing', FAILOVER true)"
    } else if server_version_num >= 150_000 {
        "(SNAPSHOT 'nothing')"
    } else {
        "NOEXPORT_SNAPSHOT"
    };
    Ok(format!(
        "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {snapshot}",
        quote_ident(slot)
    ))
}

/// `START_REPLICATION SLOT "slot" LOGICAL X/X ("name" 'value', ...)`.
pub(crate) fn start_logical_replication(
    slot: &str,
    start: Lsn,
    options: &[(String, String)],
) -> Result<String, ReplicationError> {
    validate_slot_name(slot)?;
    let mut sql = format!(
        "START_REPLICATION SLOT {} LOGICAL {start}",
        quote_ident(slot)
    );
    if !options.is_empty() {
        let options: Vec<String> = options
            .iter()
            .map(|(name, value)| format!("{} {}", quote_ident(name), quote_literal(value)))
            .collect();
        sql.push_str(" (");
        sql.push_str(&options.join(", "));
        sql.push(')');
    }
    Ok(sql)
}

/// `IDENTIFY_SYSTEM` answers one row: systemid, timeline, xlogpos, dbname.
pub(crate) fn parse_identify_system(
    rows: &[Vec<Option<String>>],
) -> Result<IdentifySystem, ReplicationError> {
    let row = single_row(rows, "IDENTIFY_SYSTEM", 4)?;
    let timeline = required(row, 1, "IDENTIFY_SYSTEM", "timeline")?;
    let xlogpos = required(row, 2, "IDENTIFY_SYSTEM", "xlogpos")?;
    Ok(IdentifySystem {
        system_id: required(row, 0, "IDENTIFY_SYSTEM", "systemid")?.to_string(),
        timeline: timeline
            .parse()
            .map_err(|_| bad_value("IDENTIFY_SYSTEM", "timeline", timeline))?,
        xlogpos: xlogpos
            .parse()
            .map_err(|_| bad_value("IDENTIFY_SYSTEM", "xlogpos", xlogpos))?,
        dbname: row[3].clone(),
    })
}

/// `CREATE_REPLICATION_SLOT` answers one row: slot_name, consistent_point,
/// snapshot_name, output_plugin.
pub(crate) fn parse_created_slot(
    rows: &[Vec<Option<String>>],
) -> Result<CreatedSlot, ReplicationError> {
    let row = single_row(rows, "CREATE_REPLICATION_SLOT", 4)?;
    let point = required(row, 1, "CREATE_REPLICATION_SLOT", "consistent_point")?;
    Ok(CreatedSlot {
        slot_name: required(row, 0, "CREATE_REPLICATION_SLOT", "slot_name")?.to_string(),
        consistent_point: point
            .parse()
            .map_err(|_| bad_value("CREATE_REPLICATION_SLOT", "consistent_point", point))?,
        snapshot_name: row[2].clone(),
        output_plugin: row[3].clone(),
    })
}

fn single_row<'a>(
    rows: &'a [Vec<Option<String>>],
    command: &str,
    columns: usize,
) -> Result<&'a [Option<String>], ReplicationError> {
    match rows {
        [row] if row.len() >= columns => Ok(row),
        _ => Err(ReplicationError::Protocol(format!(
            "{command} returned {} rows (first with {} columns); expected one row of {columns}",
            rows.len(),
            rows.first().map_or(0, Vec::len)
        ))),
    }
}

fn required<'a>(
    row: &'a [Option<String>],
    i: usize,
    command: &str,
    column: &str,
) -> Result<&'a str, ReplicationError> {
    row[i]
        .as_deref()
        .ok_or_else(|| ReplicationError::Protocol(format!("{command} returned NULL {column}")))
}

fn bad_value(command: &str, column: &str, value: &str) -> ReplicationError {
    ReplicationError::Protocol(format!(
        "{command} returned an unreadable {column}: {value:?}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(values: &[Option<&str>]) -> Vec<Option<String>> {
        values.iter().map(|v| v.map(str::to_string)).collect()
    }

    #[test]
    fn slot_names_follow_postgres_rules() {
        for ok in ["outbox", "outbox_relay_1", "_", "0", &"a".repeat(63)] {
            assert!(validate_slot_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Outbox",
            "out-box",
            "out box",
            "slot\"",
            "é",
            "a;DROP",
            &"a".repeat(64),
        ] {
            let err = validate_slot_name(bad).unwrap_err();
            assert!(
                matches!(err, ReplicationError::InvalidSlotName(ref n) if n == bad),
                "{bad}"
            );
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("proto_version"), "\"proto_version\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("\"pub\",\"x\""), "'\"pub\",\"x\"'");
    }

    #[test]
    fn create_slot_text_depends_on_version() {
        assert_eq!(
            create_logical_slot("outbox", 150004, true).unwrap(),
            "CREATE_REPLICATION_SLOT \"outbox\" LOGICAL pgoutput (SNAPSHOT 'nothing')"
        );
        assert_eq!(
            create_logical_slot("outbox", 140010, false).unwrap(),
            "CREATE_REPLICATION_SLOT \"outbox\" LOGICAL pgoutput NOEXPORT_SNAPSHOT"
        );
        assert!(create_logical_slot("Outbox", 150004, false).is_err());
        assert_eq!(
            create_logical_slot("outbox", 170002, true).unwrap(),
            "CREATE_REPLICATION_SLOT \"outbox\" LOGICAL pgoutput (SNAPSHOT 'nothing', FAILOVER true)"
        );
        assert_eq!(
            create_logical_slot("outbox", 170002, false).unwrap(),
            "CREATE_REPLICATION_SLOT \"outbox\" LOGICAL pgoutput (SNAPSHOT 'nothing')"
        );
    }

    #[test]
    fn start_replication_text() {
        let options = vec![
            ("proto_version".to_string(), "1".to_string()),
            ("publication_names".to_string(), "\"pub\"".to_string()),
            ("odd'name\"".to_string(), "it's".to_string()),
        ];
        assert_eq!(
            start_logical_replication("outbox", Lsn(0x16_B374_D848), &options).unwrap(),
            "START_REPLICATION SLOT \"outbox\" LOGICAL 16/B374D848 \
             (\"proto_version\" '1', \"publication_names\" '\"pub\"', \"odd'name\"\"\" 'it''s')"
        );
        assert_eq!(
            start_logical_replication("outbox", Lsn::ZERO, &[]).unwrap(),
            "START_REPLICATION SLOT \"outbox\" LOGICAL 0/0"
        );
        assert!(start_logical_replication("bad name", Lsn::ZERO, &[]).is_err());
    }

    #[test]
    fn identify_system_rows() {
        let rows = vec![row(&[
            Some("7301234567890123456"),
            Some("1"),
            Some("0/1A2B3C8"),
            Some("app"),
        ])];
        assert_eq!(
            parse_identify_system(&rows).unwrap(),
            IdentifySystem {
                system_id: "7301234567890123456".into(),
                timeline: 1,
                xlogpos: Lsn(0x1A2B3C8),
                dbname: Some("app".into()),
            }
        );
        let physical = vec![row(&[Some("1"), Some("1"), Some("0/0"), None])];
        assert_eq!(parse_identify_system(&physical).unwrap().dbname, None);
        for bad in [
            vec![],
            vec![row(&[Some("1"), Some("1"), Some("0/0")])],
            vec![row(&[Some("1"), Some("x"), Some("0/0"), None])],
            vec![row(&[Some("1"), Some("1"), Some("nope"), None])],
            vec![row(&[Some("1"), None, Some("0/0"), None])],
        ] {
            assert!(
                matches!(
                    parse_identify_system(&bad),
                    Err(ReplicationError::Protocol(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn created_slot_rows() {
        let rows = vec![row(&[
            Some("outbox"),
            Some("0/15D6A40"),
            None,
            Some("pgoutput"),
        ])];
        assert_eq!(
            parse_created_slot(&rows).unwrap(),
            CreatedSlot {
                slot_name: "outbox".into(),
                consistent_point: Lsn(0x15D6A40),
                snapshot_name: None,
                output_plugin: Some("pgoutput".into()),
            }
        );
        assert!(parse_created_slot(&[row(&[Some("outbox"), Some("zz"), None, None])]).is_err());
    }
}
