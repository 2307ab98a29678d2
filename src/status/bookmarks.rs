//! The periodic sample of bookmark slots (`<slot>_bookmark_<name>`) for the
//! per-bookmark gauges: a bookmark left behind by a killed replay or
//! `--keep-bookmark` pins WAL and `catalog_xmin` until someone drops it.

use tokio_postgres::Client;

use super::{BOOKMARK_INFIX, WAL_POSITION};

/// One bookmark, as the gauges show it.
#[derive(Debug, Clone, PartialEq)]
pub struct BookmarkSample {
    /// The `<name>` part.
    pub name: String,
    /// Server WAL position minus the bookmark's `restart_lsn`: WAL it keeps.
    pub retained_bytes: u64,
    /// Seconds since the bookmark was last in use: `now() - inactive_since`
    /// (PostgreSQL 17+; a bookmark is used only while a replay streams it, so
    /// for a left-behind one this is its age). `None` on older servers, and 0
    /// while a replay streams it.
    pub inactive_seconds: Option<f64>,
}

/// The bookmarks of `slot`, one query (no version check: `inactive_since` is
/// read through `to_jsonb`, NULL where the column does not exist).
pub async fn sample_bookmarks(
    client: &Client,
    slot: &str,
) -> Result<Vec<BookmarkSample>, tokio_postgres::Error> {
    let prefix = format!("{slot}{BOOKMARK_INFIX}");
    let rows = client
        .query(
            &format!(
                "SELECT s.slot_name::text, \
                 GREATEST(pg_wal_lsn_diff({WAL_POSITION}, s.restart_lsn), 0)::int8, \
                 CASE WHEN s.active THEN 0::float8 ELSE \
                   extract(epoch FROM now() - (to_jsonb(s) ->> 'inactive_since')::timestamptz)::float8 END \
                 FROM pg_replication_slots s WHERE starts_with(s.slot_name::text, $1::text) \
                 ORDER BY 1"
            ),
            &[&prefix],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let name: String = r.get(0);
            Some(BookmarkSample {
                name: name.strip_prefix(&prefix)?.to_string(),
                retained_bytes: r
                    .get::<_, Option<i64>>(1)
                    .map_or(0, |b| u64::try_from(b).unwrap_or(0)),
                inactive_seconds: r.get(2),
            })
        })
        .collect())
}
