//! The ack tracker: which LSN may be confirmed to PostgreSQL.
//!
//! Pure: events in, a flush LSN out; no IO, no clocks.
//!
//! The replication stream is an ordered sequence of transactions (Begin …
//! Commit, with the records produced from them) and keepalive markers. The
//! tracker keeps them in a FIFO in stream order. Kafka delivery reports
//! arrive in any order (several partitions, retries); each one completes a
//! record of its transaction. The flush LSN is the LSN of the last entry of
//! the longest fully-completed prefix of the FIFO:
//!
//! * a transaction is complete once its Commit arrived and every record
//!   produced from it is acknowledged; its LSN is the Commit's `end_lsn`
//!   (confirming `commit_lsn` instead would make the server resend it);
//! * a keepalive marker is complete as soon as everything before it is; its
//!   LSN is the keepalive's `wal_end`, so an idle outbox on a busy database
//!   still advances the slot.
//!
//! Invariants (checked by the property test below):
//! * the flush LSN never reaches the `commit_lsn` of a transaction that is
//!   not complete — so a restart never skips an unacknowledged record;
//! * it never exceeds the highest LSN received from the server;
//! * it never goes backwards.

use std::collections::VecDeque;

use crate::lsn::Lsn;

/// Identifies one transaction of the stream; carried by every record
/// produced from it and handed back with the delivery report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TxnToken(u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("Begin received while transaction is still open (missing Commit)")]
    NestedBegin,
    #[error("{0} received outside a transaction")]
    NoOpenTransaction(&'static str),
    #[error("delivery report for a record the tracker does not know (token {0})")]
    UnknownToken(u64),
}

#[derive(Debug)]
enum Entry {
    Txn {
        /// `None` until the Commit arrives.
        end_lsn: Option<Lsn>,
        /// Records produced and not yet acknowledged.
        pending: u64,
        /// Commit time (µs since 2000-01-01), for the time-lag metric.
        commit_time: i64,
    },
    Marker {
        lsn: Lsn,
        /// Commit time of the newest transaction folded into the marker.
        commit_time: Option<i64>,
    },
}

impl Entry {
    /// Complete entries can leave the queue; returns the LSN they confirm.
    fn completed_lsn(&self) -> Option<Lsn> {
        match *self {
            Entry::Txn {
                end_lsn: Some(lsn),
                pending: 0,
                ..
            } => Some(lsn),
            Entry::Txn { .. } => None,
            Entry::Marker { lsn, .. } => Some(lsn),
        }
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct AckTracker {
    entries: VecDeque<Entry>,
    /// Sequence number of `entries[0]`.
    base_seq: u64,
    /// The transaction between Begin and Commit, if any.
    open: Option<u64>,
    flushed: Lsn,
    received: Lsn,
    pending_records: u64,
    /// Commit time of the newest confirmed transaction.
    flushed_commit_time: Option<i64>,
}

impl AckTracker {
    /// Start from the slot's confirmed position.
    pub fn new(confirmed: Lsn) -> Self {
        AckTracker {
            entries: VecDeque::new(),
            base_seq: 0,
            open: None,
            flushed: confirmed,
            received: confirmed,
            pending_records: 0,
            flushed_commit_time: None,
        }
    }

    fn next_seq(&self) -> u64 {
        self.base_seq + self.entries.len() as u64
    }

    fn entry_mut(&mut self, seq: u64) -> Option<&mut Entry> {
        let idx = seq.checked_sub(self.base_seq)?;
        self.entries.get_mut(usize::try_from(idx).ok()?)
    }

    /// Note the highest WAL position the server has sent (XLogData `wal_end`).
    pub fn note_received(&mut self, lsn: Lsn) {
        self.received = self.received.max(lsn);
    }

    /// A transaction begins; `commit_time` is from its Begin message.
    pub fn begin(&mut self, commit_time: i64) -> Result<TxnToken, AckError> {
        if self.open.is_some() {
            return Err(AckError::NestedBegin);
        }
        let seq = self.next_seq();
        self.entries.push_back(Entry::Txn {
            end_lsn: None,
            pending: 0,
            commit_time,
        });
        self.open = Some(seq);
        Ok(TxnToken(seq))
    }

    /// The open transaction, if any (records produced from it carry this).
    pub fn open_token(&self) -> Option<TxnToken> {
        self.open.map(TxnToken)
    }

    /// A record of the open transaction was handed to the producer.
    pub fn record_sent(&mut self) -> Result<TxnToken, AckError> {
        let seq = self.open.ok_or(AckError::NoOpenTransaction("a row"))?;
        if let Some(Entry::Txn { pending, .. }) = self.entry_mut(seq) {
            *pending += 1;
        }
        self.pending_records += 1;
        Ok(TxnToken(seq))
    }

    /// The open transaction commits; `end_lsn` is the Commit message's `end_lsn`.
    pub fn commit(&mut self, end_lsn: Lsn) -> Result<(), AckError> {
        let seq = self
            .open
            .take()
            .ok_or(AckError::NoOpenTransaction("Commit"))?;
        self.note_received(end_lsn);
        if let Some(Entry::Txn { end_lsn: slot, .. }) = self.entry_mut(seq) {
            *slot = Some(end_lsn);
        }
        self.fold_back(seq);
        self.advance();
        Ok(())
    }

    /// A transaction at the back of the queue with nothing in flight (no
    /// outbox rows, or all already acknowledged) is complete: it becomes a
    /// marker, merged with a marker before it. So transactions without
    /// records (other tables on a busy publication) cost nothing while the
    /// broker holds earlier records, and the queue stays bounded by the
    /// records in flight. Only the back entry is folded: no record token
    /// refers to it (nothing pending), so its sequence number can be reused.
    fn fold_back(&mut self, seq: u64) {
        if seq + 1 != self.next_seq() {
            return;
        }
        let Some(&Entry::Txn {
            end_lsn: Some(lsn),
            pending: 0,
            commit_time,
        }) = self.entries.back()
        else {
            return;
        };
        self.entries.pop_back();
        self.push_marker(lsn, Some(commit_time));
    }

    /// Append a marker, merged into a marker already at the back.
    fn push_marker(&mut self, lsn: Lsn, commit_time: Option<i64>) {
        if let Some(Entry::Marker {
            lsn: last,
            commit_time: last_time,
        }) = self.entries.back_mut()
        {
            *last = (*last).max(lsn);
            if commit_time.is_some() {
                *last_time = commit_time;
            }
            return;
        }
        self.entries.push_back(Entry::Marker { lsn, commit_time });
    }

    /// A keepalive (or any other "the server has sent everything below this")
    /// position. Confirmed once everything before it is.
    pub fn keepalive(&mut self, wal_end: Lsn) {
        self.note_received(wal_end);
        if wal_end <= self.flushed {
            return;
        }
        if self.entries.is_empty() {
            self.flushed = wal_end;
            return;
        }
        // Coalesce consecutive markers: only the latest matters.
        // (Markers are never the open transaction, so raising one is safe.)
        self.push_marker(wal_end, None);
    }

    /// The broker acknowledged one record of transaction `token`.
    pub fn ack(&mut self, token: TxnToken) -> Result<(), AckError> {
        match self.entry_mut(token.0) {
            Some(Entry::Txn { pending, .. }) if *pending > 0 => *pending -= 1,
            _ => return Err(AckError::UnknownToken(token.0)),
        }
        self.pending_records -= 1;
        if token.0 == self.base_seq {
            self.advance();
        }
        Ok(())
    }

    fn advance(&mut self) {
        while let Some(front) = self.entries.front() {
            // An open transaction has no end_lsn yet, so it is never complete.
            let Some(lsn) = front.completed_lsn() else {
                break;
            };
            self.flushed = self.flushed.max(lsn);
            match front {
                Entry::Txn { commit_time, .. }
                | Entry::Marker {
                    commit_time: Some(commit_time),
                    ..
                } => self.flushed_commit_time = Some(*commit_time),
                Entry::Marker { .. } => {}
            }
            self.entries.pop_front();
            self.base_seq += 1;
        }
    }

    /// The position that may be confirmed (sent as `flushed` in status updates).
    pub fn flushed(&self) -> Lsn {
        self.flushed
    }

    /// Commit time of the newest confirmed transaction (µs since 2000-01-01).
    pub fn flushed_commit_time(&self) -> Option<i64> {
        self.flushed_commit_time
    }

    /// The highest position received from the server (sent as `written`).
    pub fn received(&self) -> Lsn {
        self.received
    }

    /// Records handed to the producer and not yet acknowledged.
    pub fn pending_records(&self) -> u64 {
        self.pending_records
    }

    /// True when nothing is waiting for the broker and no transaction is open.
    pub fn is_idle(&self) -> bool {
        self.open.is_none() && self.pending_records == 0
    }

    /// Entries (transactions and markers) not yet confirmed.
    pub fn queued(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lsn(v: u64) -> Lsn {
        Lsn(v)
    }

    #[test]
    fn empty_transaction_confirms_at_commit() {
        let mut t = AckTracker::new(lsn(100));
        t.begin(0).unwrap();
        t.commit(lsn(200)).unwrap();
        assert_eq!(t.flushed(), lsn(200));
        assert!(t.is_idle());
    }

    #[test]
    fn transaction_confirms_only_after_every_record_is_acked() {
        let mut t = AckTracker::new(lsn(0));
        t.begin(0).unwrap();
        let a = t.record_sent().unwrap();
        let b = t.record_sent().unwrap();
        t.commit(lsn(50)).unwrap();
        assert_eq!(t.flushed(), lsn(0));
        t.ack(a).unwrap();
        assert_eq!(t.flushed(), lsn(0));
        t.ack(b).unwrap();
        assert_eq!(t.flushed(), lsn(50));
    }

    #[test]
    fn later_transaction_acked_first_waits_for_earlier() {
        let mut t = AckTracker::new(lsn(0));
        t.begin(0).unwrap();
        let first = t.record_sent().unwrap();
        t.commit(lsn(10)).unwrap();
        t.begin(0).unwrap();
        let second = t.record_sent().unwrap();
        t.commit(lsn(20)).unwrap();
        t.ack(second).unwrap();
        assert_eq!(
            t.flushed(),
            lsn(0),
            "must not pass the unacked first transaction"
        );
        t.ack(first).unwrap();
        assert_eq!(t.flushed(), lsn(20));
    }

    #[test]
    fn open_transaction_holds_back_keepalive_marker() {
        let mut t = AckTracker::new(lsn(0));
        t.begin(0).unwrap();
        let r = t.record_sent().unwrap();
        t.keepalive(lsn(5));
        assert_eq!(t.flushed(), lsn(0));
        t.ack(r).unwrap();
        assert_eq!(t.flushed(), lsn(0), "still open: no Commit yet");
        t.commit(lsn(30)).unwrap();
        assert_eq!(t.flushed(), lsn(30));
    }

    #[test]
    fn idle_keepalive_advances_immediately() {
        let mut t = AckTracker::new(lsn(10));
        t.keepalive(lsn(90));
        assert_eq!(t.flushed(), lsn(90));
        t.keepalive(lsn(80));
        assert_eq!(t.flushed(), lsn(90), "monotonic");
    }

    #[test]
    fn keepalive_behind_pending_transaction_waits() {
        let mut t = AckTracker::new(lsn(0));
        t.begin(0).unwrap();
        let r = t.record_sent().unwrap();
        t.commit(lsn(40)).unwrap();
        t.keepalive(lsn(100));
        t.keepalive(lsn(120));
        assert_eq!(t.queued(), 2, "consecutive markers coalesce");
        assert_eq!(t.flushed(), lsn(0));
        t.ack(r).unwrap();
        assert_eq!(t.flushed(), lsn(120));
    }

    #[test]
    fn transactions_without_records_do_not_grow_the_queue() {
        // The broker holds a record; meanwhile a busy publication sends
        // thousands of transactions without outbox rows.
        let mut t = AckTracker::new(lsn(0));
        let held = t.begin(1).unwrap();
        t.record_sent().unwrap();
        t.commit(lsn(10)).unwrap();
        for i in 0..10_000u64 {
            t.begin(2 + i as i64).unwrap();
            t.commit(lsn(20 + i)).unwrap();
        }
        assert!(t.queued() <= 2, "queue grew to {}", t.queued());
        assert_eq!(t.flushed(), lsn(0), "nothing passes the held record");
        // A transaction whose records were all acknowledged folds too.
        let tok = t.begin(20_000).unwrap();
        t.record_sent().unwrap();
        t.ack(tok).unwrap();
        t.commit(lsn(20_000)).unwrap();
        assert!(t.queued() <= 2, "queue grew to {}", t.queued());
        t.ack(held).unwrap();
        assert_eq!(t.flushed(), lsn(20_000));
        assert_eq!(t.flushed_commit_time(), Some(20_000));
        assert_eq!(t.queued(), 0);
    }

    #[test]
    fn protocol_violations_are_errors() {
        let mut t = AckTracker::new(lsn(0));
        assert!(t.record_sent().is_err());
        assert!(t.commit(lsn(1)).is_err());
        t.begin(0).unwrap();
        assert_eq!(t.begin(0), Err(AckError::NestedBegin));
        assert!(t.ack(TxnToken(0)).is_err(), "no record sent yet");
        assert!(t.ack(TxnToken(99)).is_err());
    }

    #[derive(Debug, Clone)]
    enum Item {
        Txn { records: u8 },
        Keepalive,
    }

    fn stream() -> impl Strategy<Value = (Vec<Item>, Vec<usize>)> {
        let item = prop_oneof![
            3 => (0u8..5).prop_map(|records| Item::Txn { records }),
            1 => Just(Item::Keepalive),
        ];
        (
            proptest::collection::vec(item, 0..40),
            proptest::collection::vec(any::<usize>(), 200),
        )
    }

    proptest! {
        /// No completion order moves the flush LSN past an unacknowledged
        /// record, and with everything acked the flush LSN reaches the end.
        #[test]
        fn flush_never_passes_an_unacknowledged_record((items, choices) in stream()) {
            let mut t = AckTracker::new(Lsn(1000));
            // Stream events with LSNs in WAL order; commit_lsn < end_lsn.
            let mut next = 1000u64;
            // For each transaction: (commit_lsn, token, unacked records)
            let mut txns: Vec<(u64, TxnToken, u32)> = Vec::new();
            let mut outstanding: Vec<usize> = Vec::new(); // index into txns, one per unacked record
            let mut choice = choices.into_iter().cycle();
            let mut last_flushed = t.flushed();
            let mut max_received = 1000u64;

            let check = |t: &AckTracker, txns: &[(u64, TxnToken, u32)], last: Lsn, max_received: u64| {
                let flushed = t.flushed();
                assert!(flushed >= last, "flush LSN went backwards");
                assert!(flushed.0 <= max_received, "flush LSN above anything received");
                for (commit_lsn, _, unacked) in txns {
                    if *unacked > 0 {
                        assert!(flushed.0 <= *commit_lsn,
                            "flushed {flushed} reaches commit {commit_lsn} of a transaction with {unacked} unacked records");
                    }
                }
            };

            for item in items {
                match item {
                    Item::Txn { records } => {
                        let token = t.begin(0).unwrap();
                        let idx = txns.len();
                        next += 10;
                        let commit_lsn = next + u64::from(records) * 10;
                        txns.push((commit_lsn, token, 0));
                        for _ in 0..records {
                            let tok = t.record_sent().unwrap();
                            assert_eq!(tok, token);
                            txns[idx].2 += 1;
                            outstanding.push(idx);
                            // interleave some acks while the transaction is open
                            if choice.next().unwrap() % 3 == 0 && !outstanding.is_empty() {
                                let k = choice.next().unwrap() % outstanding.len();
                                let i = outstanding.swap_remove(k);
                                t.ack(txns[i].1).unwrap();
                                txns[i].2 -= 1;
                                check(&t, &txns, last_flushed, max_received);
                                last_flushed = t.flushed();
                            }
                        }
                        next = commit_lsn + 8;
                        max_received = max_received.max(next);
                        t.commit(Lsn(next)).unwrap();
                    }
                    Item::Keepalive => {
                        next += 5;
                        max_received = max_received.max(next);
                        t.keepalive(Lsn(next));
                    }
                }
                check(&t, &txns, last_flushed, max_received);
                last_flushed = t.flushed();
                // ack a random number of outstanding records in random order
                let n = choice.next().unwrap() % (outstanding.len() + 1);
                for _ in 0..n {
                    let k = choice.next().unwrap() % outstanding.len();
                    let i = outstanding.swap_remove(k);
                    t.ack(txns[i].1).unwrap();
                    txns[i].2 -= 1;
                    check(&t, &txns, last_flushed, max_received);
                    last_flushed = t.flushed();
                }
            }
            while let Some(i) = outstanding.pop() {
                t.ack(txns[i].1).unwrap();
                txns[i].2 -= 1;
                check(&t, &txns, last_flushed, max_received);
                last_flushed = t.flushed();
            }
            prop_assert_eq!(t.flushed(), Lsn(next), "everything acked: flush reaches the last position");
            prop_assert!(t.is_idle());
            prop_assert_eq!(t.queued(), 0);
        }
    }
}
