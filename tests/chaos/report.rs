//! The chaos run's account: the relay's logs boiled down, and the summary table
//! (printed, and written to `target/chaos-report.md` in long mode).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use super::check::Verdict;
use super::harness::PgVersion;
use super::load::Ledger;
use super::{FaultKind, FaultRecord, HangCheck, Plan};

/// `target/chaos-report.md` (or under `$CARGO_TARGET_DIR`).
pub fn report_path() -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("chaos-report.md")
}

/// The log without ANSI colour codes (the relay colours its log even into a file).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters... final byte in '@'..='~'.
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `error=...` of "replication session failed" lines, by their first words.
pub fn error_kinds(logs: &str) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for line in logs
        .lines()
        .filter(|l| l.contains("replication session failed"))
    {
        let Some(start) = line.find("error=") else {
            continue;
        };
        let rest = line[start + "error=".len()..].trim_start_matches('"');
        let rest = rest.split(" retry_in=").next().unwrap_or(rest);
        let kind: String = rest
            .split_whitespace()
            .take(6)
            .collect::<Vec<_>>()
            .join(" ");
        *kinds.entry(kind).or_insert(0) += 1;
    }
    kinds
}

/// ERROR lines of the relay, by message (timestamp and level cut off).
pub fn error_lines(logs: &str) -> BTreeMap<String, usize> {
    let mut lines = BTreeMap::new();
    for line in logs.lines().filter(|l| l.contains(" ERROR ")) {
        let message = line.split_once(" ERROR ").map_or(line, |(_, m)| m).trim();
        let message: String = message.chars().take(160).collect();
        *lines.entry(message).or_insert(0) += 1;
    }
    lines
}

/// The relay's "skipped transactions the broker acknowledged before" lines: how
/// many, and the records they spared (the durable progress record at work).
pub fn progress_skips(logs: &str) -> (usize, u64) {
    let mut lines = 0;
    let mut records = 0;
    for line in logs
        .lines()
        .filter(|l| l.contains("skipped transactions the broker acknowledged"))
    {
        lines += 1;
        records += line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("records="))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    (lines, records)
}

/// What the relay's logs say about the run.
pub struct RelayStats {
    /// (starts that skipped, records skipped) thanks to the progress record.
    pub progress_skips: (usize, u64),
    pub sessions_failed: usize,
    pub producer_rebuilds: usize,
    pub errors: usize,
    pub panics: usize,
    pub error_kinds: BTreeMap<String, usize>,
    pub error_lines: BTreeMap<String, usize>,
}

/// Everything the summary shows.
pub struct Report<'a> {
    pub plan: &'a Plan,
    pub seed: u64,
    pub version: PgVersion,
    pub faults_done: Duration,
    pub total: Duration,
    pub consume_time: Duration,
    pub records: &'a [FaultRecord],
    pub hangs: &'a [HangCheck],
    pub hang_margin: u64,
    pub relay_kills: usize,
    pub broker_repairs: usize,
    pub ledgers: &'a [Ledger],
    pub markers: usize,
    pub verdict: &'a Verdict,
    /// Extra deliveries no fault's window explains.
    pub duplicates_outside: usize,
    pub relay: &'a RelayStats,
    pub proxies: [(&'static str, u64, u64); 2],
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

impl Report<'_> {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let v = self.verdict;
        writeln!(
            out,
            "# outbox-relay chaos report ({} mode)\n\nPostgreSQL {}, tansu sqlite, seed {}; faults over {}, run {} in total.\n",
            self.plan.name,
            self.version,
            self.seed,
            secs(self.faults_done),
            secs(self.total)
        )
        .unwrap();
        writeln!(
            out,
            "| fault | count | length (max) | resumed (max) | caught up (max) | duplicates (per fault) |"
        )
        .unwrap();
        writeln!(out, "|---|---:|---:|---:|---:|---:|").unwrap();
        let mut by_kind: BTreeMap<FaultKind, Vec<&FaultRecord>> = BTreeMap::new();
        for r in self.records {
            by_kind.entry(r.kind).or_default().push(r);
        }
        for (kind, rs) in &by_kind {
            let max =
                |f: fn(&FaultRecord) -> Duration| rs.iter().map(|r| f(r)).max().unwrap_or_default();
            let dups: usize = rs.iter().map(|r| r.duplicates).sum();
            writeln!(
                out,
                "| {} | {} | {} | {} | {} | {dups} ({:.1}) |",
                kind.label(),
                rs.len(),
                secs(max(|r| r.length)),
                secs(max(|r| r.resumed)),
                secs(max(|r| r.caught_up)),
                dups as f64 / rs.len().max(1) as f64,
            )
            .unwrap();
        }
        let worst = self.records.iter().max_by_key(|r| r.resumed);
        let worst_catch = self.records.iter().max_by_key(|r| r.caught_up);
        let mid_hang_kills = self.relay_kills
            - self
                .records
                .iter()
                .filter(|r| r.kind == FaultKind::RelayKill)
                .count();
        let txns: usize = self.ledgers.iter().map(|l| l.committed.len()).sum();
        let rolled_back: usize = self.ledgers.iter().map(|l| l.rolled_back.len()).sum();
        let in_doubt: u64 = self.ledgers.iter().map(|l| l.in_doubt).sum();
        let in_doubt_committed: u64 = self.ledgers.iter().map(|l| l.in_doubt_committed).sum();
        let retried: u64 = self.ledgers.iter().map(|l| l.retried).sum();
        let samples: usize = self.hangs.iter().map(|h| h.samples).sum();
        writeln!(out).unwrap();
        writeln!(out, "| figure | value |").unwrap();
        writeln!(out, "|---|---|").unwrap();
        let mut row = |k: &str, v: String| writeln!(out, "| {k} | {v} |").unwrap();
        row(
            "faults injected",
            format!(
                "{} (+{mid_hang_kills} relay kills during hangs; {} relay kills in all)",
                self.records.len(),
                self.relay_kills
            ),
        );
        row(
            "rows committed",
            format!(
                "{} in {txns} transactions by {} writers, + {} marker rows",
                v.rows - self.markers,
                self.ledgers.len(),
                self.markers
            ),
        );
        row(
            "rows rolled back (must never appear)",
            rolled_back.to_string(),
        );
        row(
            "writer transactions in doubt after an outage",
            format!("{in_doubt} ({in_doubt_committed} had committed, {retried} sent again)"),
        );
        row(
            "records consumed",
            format!(
                "{} (read back in {})",
                v.deliveries,
                secs(self.consume_time)
            ),
        );
        row("missing", v.missing.count.to_string());
        row(
            "duplicates",
            format!(
                "{} ({:.2}% of rows)",
                v.duplicates,
                100.0 * v.duplicates as f64 / v.rows.max(1) as f64
            ),
        );
        row(
            "duplicates outside every fault's window",
            self.duplicates_outside.to_string(),
        );
        row(
            "restarts that skipped acknowledged transactions (progress record) / records skipped",
            format!(
                "{} / {}",
                self.relay.progress_skips.0, self.relay.progress_skips.1
            ),
        );
        row(
            "phantom / mismatched / provenance / order problems",
            format!(
                "{} / {} / {} / {}",
                v.phantoms.count, v.mismatches.count, v.provenance.count, v.order.count
            ),
        );
        row(
            "max recovery (fault end → delivering again)",
            worst
                .map(|r| {
                    format!(
                        "{} after {} at {}",
                        secs(r.resumed),
                        r.kind.label(),
                        secs(r.at)
                    )
                })
                .unwrap_or_default(),
        );
        row(
            "max catch-up (fault end → slot past the WAL of then)",
            worst_catch
                .map(|r| {
                    format!(
                        "{} after {} at {}",
                        secs(r.caught_up),
                        r.kind.label(),
                        secs(r.at)
                    )
                })
                .unwrap_or_default(),
        );
        row(
            "slot during broker hangs",
            format!(
                "{} hangs, {samples} samples, never past an unacknowledged commit{}",
                self.hangs.len(),
                if self.hang_margin == u64::MAX {
                    String::new()
                } else {
                    format!(" (closest: {} bytes below)", self.hang_margin)
                }
            ),
        );
        row(
            "broker restarts after a tansu storage panic (tansu bug, not scheduled)",
            self.broker_repairs.to_string(),
        );
        row(
            "relay sessions failed / producer rebuilds / ERROR lines / panics",
            format!(
                "{} / {} / {} / {}",
                self.relay.sessions_failed,
                self.relay.producer_rebuilds,
                self.relay.errors,
                self.relay.panics
            ),
        );
        for (name, accepted, reset) in self.proxies {
            row(
                &format!("{name} proxy connections / reset"),
                format!("{accepted} / {reset}"),
            );
        }
        if !self.relay.error_kinds.is_empty() {
            writeln!(
                out,
                "\nWhy relay sessions failed (first words of the error):\n"
            )
            .unwrap();
            for (k, n) in &self.relay.error_kinds {
                writeln!(out, "- {n} × {k}").unwrap();
            }
        }
        if !self.relay.error_lines.is_empty() {
            writeln!(out, "\nRelay ERROR lines:\n").unwrap();
            for (k, n) in &self.relay.error_lines {
                writeln!(out, "- {n} × {k}").unwrap();
            }
        }
        writeln!(
            out,
            "\nDuplicates come from replays: a relay killed or reconnected resumes from \
             the slot's confirmed position (after `-m immediate` the slot itself goes back \
             to the position saved at the last checkpoint), minus what the durable progress \
             record says the broker acknowledged; records in flight when the fault hit are \
             sent again. Each extra delivery is charged to the latest faults whose window \
             (lowest slot position around the fault → WAL at its end) holds its commit."
        )
        .unwrap();
        writeln!(out, "\n## Events\n").unwrap();
        writeln!(
            out,
            "| at | fault | length | resumed | caught up | duplicates | note |"
        )
        .unwrap();
        writeln!(out, "|---:|---|---:|---:|---:|---:|---|").unwrap();
        for r in self.records {
            writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                secs(r.at),
                r.kind.label(),
                secs(r.length),
                secs(r.resumed),
                secs(r.caught_up),
                r.duplicates,
                r.note
            )
            .unwrap();
        }
        out
    }
}
