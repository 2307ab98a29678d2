//! Slot identity: what one process knows of the server and the slot it streams
//! from, kept across its sessions, and the rules that keep a reconnect from
//! streaming past a gap (design: guarantee 8, replication rule 6).
//!
//! * Only a process that has never seen its slot may create it. A slot that is
//!   gone later was dropped, or the server behind the address is another one:
//!   a new slot would start at the current WAL position and every event in
//!   between would be lost without a word. That is fatal, with the gap named.
//! * The server is remembered by `IDENTIFY_SYSTEM`'s system identifier and
//!   timeline. Another system identifier is another cluster: fatal. Another
//!   timeline is a promotion; the slot there is ours only if it is a failover
//!   slot (PostgreSQL 17 synchronises those to standbys); otherwise fatal.
//!
//! Pure: the session feeds it facts, it answers with a verdict.

use std::time::Duration;

use crate::lsn::{pg_micros_to_system_time, Lsn};

/// `IDENTIFY_SYSTEM`'s answer, the part that names a server's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerIdentity {
    pub system_id: String,
    pub timeline: u32,
}

/// What the process knows, across sessions.
#[derive(Debug, Default)]
pub(super) struct Memory {
    /// The server of the first session that identified it.
    pub server: Option<ServerIdentity>,
    /// A session of this process found or created the slot.
    pub slot_seen: bool,
    /// The highest position this process confirmed to PostgreSQL.
    pub confirmed: Option<Lsn>,
    /// Commit time (µs since 2000-01-01) of the newest transaction covered by
    /// `confirmed`, if any was.
    pub confirmed_commit_time: Option<i64>,
}

/// Why a session must not stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gap {
    /// The slot this process streamed from is gone.
    SlotGone,
    /// Another cluster answers at the address.
    OtherSystem { was: String, now: String },
    /// The server was promoted (or restored) onto another timeline and the
    /// slot there is not a failover slot: it is not the one we confirmed to.
    Timeline { was: u32, now: u32 },
    /// The server was promoted from a standby whose history left timeline
    /// `was` at `fork`, before the position this process had confirmed: the
    /// transactions in between reached Kafka, but this server never got them,
    /// and its slot cannot be trusted to line up with what was delivered.
    Forked {
        was: u32,
        now: u32,
        fork: Lsn,
        confirmed: Lsn,
    },
    /// The new timeline's history does not come from the one this process
    /// streamed on.
    NotDescended { was: u32, now: u32 },
    /// A process that never saw the slot, on a promoted server: the progress
    /// table (replicated from the old primary) records that the slot existed
    /// on an earlier timeline of this cluster, and the slot here is missing
    /// or not a failover slot, so it did not come through the promotion.
    LostInFailover {
        recorded_timeline: u32,
        now: u32,
        recorded: Lsn,
        /// `DELETE …` of the progress row, for after the backfill.
        forget: String,
    },
}

impl Memory {
    /// Judge the server a session reached. The first answer is remembered.
    /// `slot_failover` is the slot's PostgreSQL 17 `failover` flag (false when
    /// the slot is missing or the server is older).
    pub fn check_server(&mut self, now: &ServerIdentity, slot_failover: bool) -> Result<(), Gap> {
        let Some(was) = &self.server else {
            self.server = Some(now.clone());
            return Ok(());
        };
        if was.system_id != now.system_id {
            return Err(Gap::OtherSystem {
                was: was.system_id.clone(),
                now: now.system_id.clone(),
            });
        }
        if was.timeline != now.timeline {
            if !slot_failover {
                return Err(Gap::Timeline {
                    was: was.timeline,
                    now: now.timeline,
                });
            }
            // A failover slot carried over by the promotion: follow it.
            self.server = Some(now.clone());
        }
        Ok(())
    }

    /// The server moved from timeline `was` (of the same system) to a new one,
    /// with a failover slot: does its history (the `TIMELINE_HISTORY` file of
    /// the new timeline) hold everything this process confirmed? A synced slot
    /// behind what was confirmed is fine (those transactions come again:
    /// duplicates); a fork below it is not.
    pub fn check_fork(&self, was: u32, now: u32, history: &str) -> Result<(), Gap> {
        let Some(fork) = fork_point(history, was) else {
            return Err(Gap::NotDescended { was, now });
        };
        match self.confirmed {
            Some(confirmed) if confirmed > fork => Err(Gap::Forked {
                was,
                now,
                fork,
                confirmed,
            }),
            _ => Ok(()),
        }
    }

    /// The slot is missing: may this session create it?
    pub fn may_create_slot(&self) -> Result<(), Gap> {
        if self.slot_seen {
            Err(Gap::SlotGone)
        } else {
            Ok(())
        }
    }

    /// A session ended with the tracker at `confirmed`.
    pub fn note_confirmed(&mut self, confirmed: Lsn, commit_time: Option<i64>) {
        if self.confirmed.map_or(true, |c| confirmed >= c) {
            self.confirmed = Some(confirmed);
            if commit_time.is_some() {
                self.confirmed_commit_time = commit_time;
            }
        }
    }

    /// What was delivered, and how to backfill what may be missing after it:
    /// one sentence for the fatal error.
    pub fn describe_loss(&self) -> String {
        let position = match self.confirmed {
            Some(lsn) => format!("the relay had confirmed everything up to {lsn}"),
            None => "the relay had confirmed nothing yet in this process".to_string(),
        };
        match self.confirmed_commit_time {
            Some(micros) => {
                // Table replay takes rows by created_at, which is the inserting
                // transaction's start, so it needs a margin before the commit.
                let at = pg_micros_to_system_time(micros);
                let from = at
                    .checked_sub(Duration::from_secs(60))
                    .unwrap_or(at);
                format!(
                    "{position}; the last transaction delivered committed at {}. Events committed after it may be missing from Kafka: backfill them from the outbox table with `outbox-relay replay --from-time {}` (a minute of margin; consumers deduplicate by id)",
                    humantime::format_rfc3339_micros(at),
                    humantime::format_rfc3339_seconds(from),
                )
            }
            None => format!(
                "{position}; no transaction was delivered by this process, so events since it started may be missing from Kafka: backfill them from the outbox table with `outbox-relay replay --from-time <when the relay last ran>`"
            ),
        }
    }
}

/// Where timeline `tli` ended, from a timeline history file (lines of
/// `parent_tli<TAB>switchpoint<TAB>reason`); `None` if it is not an ancestor.
pub fn fork_point(history: &str, tli: u32) -> Option<Lsn> {
    history.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let parent: u32 = fields.next()?.parse().ok()?;
        let lsn: Lsn = fields.next()?.parse().ok()?;
        (parent == tli).then_some(lsn)
    })
}

impl Gap {
    pub fn describe(&self, slot: &str) -> String {
        match self {
            Gap::Forked { was, now, fork, confirmed } => format!(
                "the server was promoted from a standby that left timeline {was} at {fork} (now timeline {now}), but the relay had confirmed up to {confirmed} on the old primary: transactions in {fork}..{confirmed} reached Kafka but this server never received them, so its slot {slot:?} does not line up with what was delivered (set synchronized_standby_slots on the primary so the relay never gets ahead of the standby)"
            ),
            Gap::LostInFailover {
                recorded_timeline,
                now,
                recorded,
                forget,
            } => format!(
                "the progress table records that slot {slot:?} delivered up to {recorded} on timeline {recorded_timeline} of this cluster, and the server is now on timeline {now} where the slot is missing or not a failover slot: the slot did not survive the promotion. After the backfill, forget the old slot ({forget}) so that a new one may be used"
            ),
            Gap::NotDescended { was, now } => format!(
                "the server is on timeline {now}, whose history does not include timeline {was} the relay streamed on: its slot {slot:?} is not the one this relay confirmed to"
            ),
            Gap::SlotGone => format!(
                "replication slot {slot:?} is gone: it was dropped, or the server behind the address no longer has it (a failover to a server without the slot)"
            ),
            Gap::OtherSystem { was, now } => format!(
                "the server behind the address is another PostgreSQL cluster (system identifier {now}, was {was}): its slot {slot:?} is not the one this relay confirmed to"
            ),
            Gap::Timeline { was, now } => format!(
                "the server moved from timeline {was} to {now} (a promotion or a restore) and its slot {slot:?} is not a failover slot, so it is not the one this relay confirmed to"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(id: &str, tli: u32) -> ServerIdentity {
        ServerIdentity {
            system_id: id.into(),
            timeline: tli,
        }
    }

    #[test]
    fn first_server_is_remembered_and_the_same_one_passes() {
        let mut m = Memory::default();
        assert_eq!(m.check_server(&server("1", 1), false), Ok(()));
        assert_eq!(m.check_server(&server("1", 1), false), Ok(()));
    }

    #[test]
    fn another_system_is_a_gap_even_with_a_failover_slot() {
        let mut m = Memory::default();
        m.check_server(&server("1", 1), false).unwrap();
        assert!(matches!(
            m.check_server(&server("2", 1), true),
            Err(Gap::OtherSystem { .. })
        ));
    }

    #[test]
    fn a_new_timeline_needs_a_failover_slot() {
        let mut m = Memory::default();
        m.check_server(&server("1", 1), false).unwrap();
        assert_eq!(
            m.check_server(&server("1", 2), false),
            Err(Gap::Timeline { was: 1, now: 2 })
        );
        assert_eq!(m.check_server(&server("1", 2), true), Ok(()));
        // Followed: the new timeline is now the known one.
        assert_eq!(m.check_server(&server("1", 2), false), Ok(()));
    }

    #[test]
    fn a_fork_at_or_after_the_confirmed_position_is_followed() {
        // The history file of timeline 2 after a promotion at 0/3000060.
        let history = "1\t0/3000060\tno recovery target specified\n";
        assert_eq!(fork_point(history, 1), Some(Lsn(0x3000060)));
        assert_eq!(fork_point(history, 2), None);
        let mut m = Memory::default();
        // Nothing confirmed yet: nothing can be missing.
        assert_eq!(m.check_fork(1, 2, history), Ok(()));
        m.note_confirmed(Lsn(0x3000060), None);
        assert_eq!(m.check_fork(1, 2, history), Ok(()));
        m.note_confirmed(Lsn(0x3000061), None);
        assert_eq!(
            m.check_fork(1, 2, history),
            Err(Gap::Forked {
                was: 1,
                now: 2,
                fork: Lsn(0x3000060),
                confirmed: Lsn(0x3000061)
            })
        );
        // Two promotions: timeline 3's file lists 1 and 2.
        let history3 = "1\t0/3000060\tx\n2\t0/5000000\ty\n";
        let mut m = Memory::default();
        m.note_confirmed(Lsn(0x3000000), None);
        assert_eq!(m.check_fork(1, 3, history3), Ok(()));
        m.note_confirmed(Lsn(0x4000000), None);
        assert!(m.check_fork(1, 3, history3).is_err());
        assert_eq!(m.check_fork(2, 3, history3), Ok(()));
        assert_eq!(
            m.check_fork(4, 5, history3),
            Err(Gap::NotDescended { was: 4, now: 5 })
        );
        assert!(Gap::Forked {
            was: 1,
            now: 2,
            fork: Lsn(0x10),
            confirmed: Lsn(0x20)
        }
        .describe("s")
        .contains("0/10..0/20"));
    }

    #[test]
    fn only_a_process_that_never_saw_the_slot_may_create_it() {
        let mut m = Memory::default();
        assert_eq!(m.may_create_slot(), Ok(()));
        m.slot_seen = true;
        assert_eq!(m.may_create_slot(), Err(Gap::SlotGone));
    }

    #[test]
    fn the_loss_names_the_position_the_time_and_the_backfill() {
        let mut m = Memory::default();
        m.note_confirmed(Lsn(0x100), None);
        // 2026-01-01T00:00:00Z in µs since 2000-01-01.
        let t = 820_540_800_000_000;
        m.note_confirmed(Lsn(0x200), Some(t));
        m.note_confirmed(Lsn(0x150), None); // never backwards
        let text = m.describe_loss();
        assert!(text.contains("0/200"), "{text}");
        assert!(text.contains("2026-01-01T00:00:00"), "{text}");
        assert!(
            text.contains("replay --from-time 2025-12-31T23:59:00Z"),
            "{text}"
        );
    }
}
