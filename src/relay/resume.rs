//! Where a session resumes: the slot's confirmed position, or `--start-lsn`
//! above it (below it is refused: a logical slot cannot rewind), and the
//! durable progress record below which already-acknowledged transactions are
//! skipped after a PostgreSQL crash (see [`super::progress`]).

use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

use crate::config::PostgresConfig;
use crate::lsn::Lsn;
use crate::sql::SqlConnection;

use super::{identity, progress, Relay, RelayError, LOG_TARGET};

impl Relay {
    /// The position to ask `START_REPLICATION` for: [`Lsn::ZERO`] (the slot's
    /// confirmed position) unless `--start-lsn` is above it.
    pub(super) async fn start_position(
        &self,
        client: &SqlConnection,
        pg: &PostgresConfig,
        confirmed: Lsn,
    ) -> Result<Lsn, RelayError> {
        Ok(match self.opts.start_lsn {
            // The operator's check is for the position they gave at start;
            // later sessions resume from the slot (still never below `start`).
            Some(start) if start < confirmed && !self.started => {
                return Err(RelayError::StartBelowConfirmed {
                    start,
                    confirmed,
                    slot: pg.slot.clone(),
                })
            }
            Some(start) if start > confirmed => {
                if !self.started {
                    warn_skipped(client, pg, confirmed, start).await;
                }
                start
            }
            _ => Lsn::ZERO,
        })
    }

    /// Read the progress record (if it belongs to this slot on this server)
    /// and start its writer. Without the table (no privilege to create it),
    /// say so once and run without: duplicates are then bounded by the slot.
    pub(super) async fn durable_progress(
        &mut self,
        pg: &PostgresConfig,
        client: &SqlConnection,
        server: &identity::ServerIdentity,
        database: String,
        confirmed: Lsn,
    ) -> (
        Lsn,
        Option<watch::Sender<Lsn>>,
        Option<AbortOnDropHandle<()>>,
    ) {
        let owner = progress::Owner {
            slot: pg.slot.clone(),
            database,
            system_id: server.system_id.clone(),
            timeline: server.timeline,
        };
        let recorded = match progress::prepare(client, &pg.table).await {
            Ok(()) => progress::read(client, &pg.table, &owner).await,
            Err(e) => Err(e),
        };
        let recorded = match recorded {
            Ok(r) => {
                self.progress_warned = false;
                r
            }
            Err(e) => {
                if !self.progress_warned {
                    tracing::warn!(target: LOG_TARGET,
                        error = %e,
                        table = %progress::table_name(&pg.table),
                        "cannot use the progress table: after a PostgreSQL crash the relay re-sends what the slot forgot (create it with sql/04_progress.sql, or grant the relay CREATE on the schema)"
                    );
                    self.progress_warned = true;
                }
                return (Lsn::ZERO, None, None);
            }
        };
        // What the last session of this process saw acknowledged on this very
        // server and timeline counts too: it may be ahead of the record.
        let remembered = self
            .acked
            .as_ref()
            .filter(|(on, _)| on == server)
            .map(|&(_, lsn)| lsn);
        let known = recorded.max(remembered);
        let skip_below = known.filter(|&r| r > confirmed).unwrap_or(Lsn::ZERO);
        let (tx, rx) = watch::channel(recorded.unwrap_or(Lsn::ZERO).max(confirmed));
        if let Some(r) = remembered {
            // Record it now: the writer writes what changes.
            tx.send_if_modified(|v| {
                let moved = r > *v;
                *v = (*v).max(r);
                moved
            });
        }
        let writer = tokio::spawn(progress::writer(pg.clone(), pg.table.clone(), owner, rx));
        (skip_below, Some(tx), Some(AbortOnDropHandle::new(writer)))
    }
}

/// `--start-lsn` above the confirmed position: say what will be skipped,
/// counting the outbox rows in between with a (non-consuming) peek.
async fn warn_skipped(
    client: &tokio_postgres::Client,
    pg: &PostgresConfig,
    confirmed: Lsn,
    start: Lsn,
) {
    let count = client
        .query_one(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, NULL, \
             'proto_version', '1', 'publication_names', $3) WHERE get_byte(data, 0) = 73",
            // pgoutput parses publication_names as a list of identifiers.
            &[
                &pg.slot,
                &start.to_string(),
                &format!("\"{}\"", pg.publication.replace('"', "\"\"")),
            ],
        )
        .await
        .map(|row| row.get::<_, i64>(0));
    match count {
        Ok(n) => tracing::warn!(target: LOG_TARGET,
            from = %confirmed, to = %start, skipped_rows = n,
            "--start-lsn skips every transaction committing between the slot's confirmed position and the start position, for good"
        ),
        Err(e) => tracing::warn!(target: LOG_TARGET,
            from = %confirmed, to = %start, error = %crate::setup::describe_pg_error(&e),
            "--start-lsn skips every transaction committing between the slot's confirmed position and the start position, for good (could not count them)"
        ),
    }
}
