//! `--delete-delivered`: delete outbox rows once the slot's confirmed position
//! has passed their transaction, by id, in batches, over an SQL connection.
//!
//! Safety: a row is deleted only after the status update that confirms its
//! transaction's commit `end_lsn` was sent, and that position is the ack
//! tracker's flush position: every record of the transaction was acknowledged
//! by Kafka. The publication publishes inserts only, so the deletes are never
//! relayed.
//!
//! Bounds: the session holds at most [`MAX_PENDING_IDS`] ids (of transactions
//! in flight, waiting for confirmation, or waiting for the deleter), the
//! deleter at most [`CHANNEL_BATCHES`] batches of [`BATCH`]. When the cap is
//! hit (the deleter cannot keep up, or its connection fails), the rows of
//! further transactions are *not* deleted: they stay in the table (nothing is
//! lost, the table just keeps them) and a warning says how to remove them. The
//! same holds for rows confirmed just before a crash or restart: deleting is
//! at most once; a periodic `DELETE ... WHERE created_at < ...` is the backstop.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::config::{quote_ident, PostgresConfig, TableName};
use crate::lsn::Lsn;
use crate::sql::SqlConnection;

/// Ids per DELETE statement.
pub const BATCH: usize = 1000;
/// Ids the session holds at most (about 60 bytes each).
pub const MAX_PENDING_IDS: usize = 100_000;
/// Batches queued for the deleter at most.
pub const CHANNEL_BATCHES: usize = 4;
/// The deleter closes its connection after this long without work, so it
/// never holds up a smart shutdown of the server.
const IDLE_CLOSE: Duration = Duration::from_secs(1);
/// Pause before retrying a failed DELETE.
const RETRY: Duration = Duration::from_secs(1);

/// The session's side: which rows may be deleted when. Pure bookkeeping but
/// for the non-blocking hand-over to the deleter task.
#[derive(Debug)]
pub(super) struct Cleanup {
    /// Ids of the open transaction.
    open: Vec<Bytes>,
    /// Committed transactions (their `end_lsn`) not yet confirmed.
    committed: VecDeque<(Lsn, Vec<Bytes>)>,
    /// Confirmed ids the deleter has not taken yet, in batches.
    ready: VecDeque<Vec<Bytes>>,
    /// Ids in `open`, `committed` and `ready`.
    held: usize,
    /// Ids not noted because of the cap, not reported yet.
    left: u64,
    tx: Option<mpsc::Sender<Vec<Bytes>>>,
}

impl Cleanup {
    /// Bookkeeping handing batches to `tx` (`None`: keep them, for tests).
    pub(super) fn new(tx: Option<mpsc::Sender<Vec<Bytes>>>) -> Cleanup {
        Cleanup {
            open: Vec::new(),
            committed: VecDeque::new(),
            ready: VecDeque::new(),
            held: 0,
            left: 0,
            tx,
        }
    }

    /// A row of the open transaction was handed to the producer. The id is
    /// copied: a slice would pin its whole replication frame in memory.
    pub(super) fn note(&mut self, id: &[u8]) {
        if self.held >= MAX_PENDING_IDS {
            if self.left == 0 {
                tracing::warn!(
                    cap = MAX_PENDING_IDS,
                    "--delete-delivered cannot keep up (the deleting connection is slow or failing): rows of further transactions stay in the outbox table; delete them with a periodic DELETE ... WHERE created_at < ..."
                );
            }
            self.left += 1;
            return;
        }
        self.open.push(Bytes::copy_from_slice(id));
        self.held += 1;
    }

    /// The open transaction committed at `end_lsn`.
    pub(super) fn commit(&mut self, end_lsn: Lsn) {
        if !self.open.is_empty() {
            self.committed
                .push_back((end_lsn, std::mem::take(&mut self.open)));
        }
    }

    /// Ids held (for tests and bounds).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.held
    }

    /// Status updates told PostgreSQL `confirmed`: every transaction ending
    /// at or below it was acknowledged; its rows may go.
    pub(super) fn confirmed(&mut self, confirmed: Lsn) {
        while let Some((end, _)) = self.committed.front() {
            if *end > confirmed {
                break;
            }
            let (_, ids) = self.committed.pop_front().expect("front exists");
            for chunk in ids.chunks(BATCH) {
                match self.ready.back_mut() {
                    Some(last) if last.len() + chunk.len() <= BATCH => {
                        last.extend_from_slice(chunk)
                    }
                    _ => self.ready.push_back(chunk.to_vec()),
                }
            }
        }
        self.hand_over();
    }

    /// Give the deleter what it has room for; the rest waits here.
    fn hand_over(&mut self) {
        let Some(tx) = &self.tx else { return };
        while let Some(batch) = self.ready.pop_front() {
            let n = batch.len();
            match tx.try_send(batch) {
                Ok(()) => {
                    self.held -= n;
                }
                Err(mpsc::error::TrySendError::Full(batch)) => {
                    self.ready.push_front(batch);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    // The deleter is gone (it logged why): the rows stay.
                    self.held -= n;
                }
            }
        }
        if self.left > 0 && self.held < MAX_PENDING_IDS / 2 {
            tracing::warn!(
                rows = self.left,
                "--delete-delivered caught up; the rows of the transactions in between stay in the outbox table"
            );
            self.left = 0;
        }
    }

    /// Ready batches (tests without a deleter).
    #[cfg(test)]
    fn ready_ids(&self) -> Vec<Bytes> {
        self.ready.iter().flatten().cloned().collect()
    }
}

/// The channel to a new deleter task for `table`'s rows by `id_column`.
pub(super) fn spawn(
    pg: PostgresConfig,
    table: TableName,
    id_column: String,
) -> mpsc::Sender<Vec<Bytes>> {
    let (tx, rx) = mpsc::channel(CHANNEL_BATCHES);
    tokio::spawn(deleter(pg, table, id_column, rx));
    tx
}

/// Deletes each batch it receives; drains what is queued after the session
/// ended, then exits.
async fn deleter(
    pg: PostgresConfig,
    table: TableName,
    id_column: String,
    mut batches: mpsc::Receiver<Vec<Bytes>>,
) {
    let mut client: Option<SqlConnection> = None;
    let mut sql: Option<String> = None;
    let mut failing = false;
    loop {
        let batch = match tokio::time::timeout(IDLE_CLOSE, batches.recv()).await {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(_) => {
                client = None;
                match batches.recv().await {
                    Some(b) => b,
                    None => return,
                }
            }
        };
        let ids: Vec<String> = batch
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        loop {
            match delete(&pg, &table, &id_column, &mut client, &mut sql, &ids).await {
                Ok(n) => {
                    tracing::debug!(
                        ids = ids.len(),
                        deleted = n,
                        "deleted delivered outbox rows"
                    );
                    if failing {
                        tracing::info!("--delete-delivered deletes again");
                    }
                    failing = false;
                    break;
                }
                Err(e) => {
                    client = None;
                    if !failing {
                        tracing::error!(error = %e, table = %table, "--delete-delivered cannot delete delivered rows; they stay in the table until it can (grant the relay's role DELETE on the table, see `outbox-relay check`)");
                    }
                    failing = true;
                    if batches.is_closed() {
                        return; // the session ended: leave the rows
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }
}

async fn delete(
    pg: &PostgresConfig,
    table: &TableName,
    id_column: &str,
    client: &mut Option<SqlConnection>,
    sql: &mut Option<String>,
    ids: &[String],
) -> Result<u64, String> {
    if client.is_none() {
        *client = Some(
            crate::sql::connect(pg)
                .await
                .map_err(|e| format!("connecting: {e}"))?,
        );
    }
    let c = client.as_ref().expect("just connected");
    let describe = |e: tokio_postgres::Error| crate::setup::describe_pg_error(&e);
    if sql.is_none() {
        // The id column's own type, so the DELETE uses its index.
        let ty: String = c
            .query_one(
                "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                 WHERE a.attrelid = $1::text::regclass AND a.attname = $2 AND NOT a.attisdropped",
                &[&table.to_string(), &id_column],
            )
            .await
            .map_err(describe)?
            .get(0);
        *sql = Some(format!(
            "DELETE FROM {table} WHERE {col} = ANY($1::text[]::{ty}[])",
            col = quote_ident(id_column)
        ));
    }
    c.execute(sql.as_deref().expect("just built"), &[&ids])
        .await
        .map_err(describe)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> Bytes {
        Bytes::from(n.to_string())
    }

    #[test]
    fn rows_become_ready_only_once_their_transaction_is_confirmed() {
        let mut c = Cleanup::new(None);
        c.note(&id(1));
        c.note(&id(2));
        c.commit(Lsn(100));
        c.note(&id(3));
        c.commit(Lsn(200));
        c.note(&id(4)); // open transaction
        c.confirmed(Lsn(99));
        assert!(c.ready_ids().is_empty());
        c.confirmed(Lsn(100));
        assert_eq!(c.ready_ids(), vec![id(1), id(2)]);
        c.confirmed(Lsn(150));
        assert_eq!(c.ready_ids().len(), 2);
        // An open transaction's rows are never ready, whatever the position.
        c.confirmed(Lsn(10_000));
        assert_eq!(c.ready_ids(), vec![id(1), id(2), id(3)]);
        assert_eq!(c.held(), 4);
    }

    #[test]
    fn ids_are_copied_out_of_their_frame() {
        let frame = Bytes::from(vec![b'7'; 64 << 10]);
        let mut c = Cleanup::new(None);
        c.note(&frame[..4]);
        assert_ne!(c.open[0].as_ptr(), frame.as_ptr(), "a slice pins the frame");
        assert_eq!(&c.open[0][..], b"7777");
    }

    #[test]
    fn the_cap_bounds_what_is_held_and_leaves_rows_in_the_table() {
        let mut c = Cleanup::new(None);
        for n in 0..(MAX_PENDING_IDS as u64 + 10) {
            c.note(&id(n));
        }
        assert_eq!(c.held(), MAX_PENDING_IDS);
        assert_eq!(c.left, 10);
        c.commit(Lsn(1));
        c.confirmed(Lsn(1));
        assert!(c.ready.iter().all(|b| b.len() <= BATCH));
    }

    #[tokio::test]
    async fn batches_wait_while_the_deleter_is_busy() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut c = Cleanup::new(Some(tx));
        for n in 0..(BATCH as u64 * 3) {
            c.note(&id(n));
        }
        c.commit(Lsn(5));
        c.confirmed(Lsn(5));
        // One batch handed over, two wait (bounded by the cap, not dropped).
        assert_eq!(c.held(), 2 * BATCH);
        assert_eq!(rx.recv().await.unwrap().len(), BATCH);
        c.confirmed(Lsn(5));
        assert_eq!(c.held(), BATCH);
    }
}
