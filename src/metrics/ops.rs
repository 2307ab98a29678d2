//! Metrics an operator reads about the relay's role and the freshness of
//! what it reports: the role (streaming, standby, down) and the age of the
//! last successful slot sample. Kept apart from the hot-path metrics; the
//! `impl Metrics` block here adds the methods that feed them.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::readiness::{Ready, Role};
use super::{names, Metrics, Registrar};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RoleLabel {
    role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub(super) struct BookmarkLabel {
    bookmark: String,
}

/// Bookmarks with a label of their own; the rest are summed (retained bytes)
/// and maxed (age) under `bookmark="_other"`.
pub const MAX_BOOKMARK_LABELS: usize = 10;

#[derive(Default)]
struct BookmarkState {
    /// Labels set by the last sample (to remove the ones that went away).
    labels: Vec<BookmarkLabel>,
    /// When this process first saw each bookmark (the age where the server
    /// has no `inactive_since`, before PostgreSQL 17).
    first_seen: std::collections::HashMap<String, Instant>,
}

pub(super) struct OpsMetrics {
    role: [Gauge; Role::ALL.len()],
    slot_sample_age: Gauge<f64, AtomicU64>,
    slot_sample_errors: Counter,
    /// When the last slot sample succeeded.
    last_sample: std::sync::Mutex<Option<Instant>>,
    bookmark_retained: Family<BookmarkLabel, Gauge>,
    bookmark_age: Family<BookmarkLabel, Gauge<f64, AtomicU64>>,
    bookmarks: std::sync::Mutex<BookmarkState>,
}

impl OpsMetrics {
    pub(super) fn register(r: &mut Registrar) -> Self {
        let family = r.add(
            names::ROLE,
            "1 for the relay's current role: streaming, standby (another process holds the slot), down",
            Family::<RoleLabel, Gauge>::default(),
        );
        let role = std::array::from_fn(|i| {
            family
                .get_or_create(&RoleLabel {
                    role: Role::ALL[i].as_str(),
                })
                .clone()
        });
        let slot_sample_age = r.add(
            names::SLOT_SAMPLE_AGE_SECONDS,
            "Seconds since the last successful SQL sample of the slot; -1 before the first",
            Gauge::<f64, AtomicU64>::default(),
        );
        slot_sample_age.set(-1.0);
        let slot_sample_errors = r.add(
            names::SLOT_SAMPLE_ERRORS_TOTAL,
            "SQL samples of the slot that failed",
            Counter::default(),
        );
        let bookmark_retained = r.add(
            names::BOOKMARK_RETAINED_WAL_BYTES,
            "WAL a bookmark slot keeps on the server: server WAL position minus its restart_lsn",
            Family::<BookmarkLabel, Gauge>::default(),
        );
        let bookmark_age = r.add(
            names::BOOKMARK_AGE_SECONDS,
            "Seconds a bookmark slot has been unused (PostgreSQL 17+ inactive_since; before: since this relay first saw it)",
            Family::<BookmarkLabel, Gauge<f64, AtomicU64>>::default(),
        );
        OpsMetrics {
            role,
            slot_sample_age,
            slot_sample_errors,
            last_sample: std::sync::Mutex::new(None),
            bookmark_retained,
            bookmark_age,
            bookmarks: std::sync::Mutex::new(BookmarkState::default()),
        }
    }

    /// Scrape-time values.
    pub(super) fn on_scrape(&self, role: Role, now: Instant) {
        for (i, gauge) in self.role.iter().enumerate() {
            gauge.set(i64::from(Role::ALL[i] == role));
        }
        let last = *self
            .last_sample
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(at) = last {
            self.slot_sample_age
                .set(now.saturating_duration_since(at).as_secs_f64());
        }
    }
}

impl Metrics {
    /// A standby sample (see [`super::Readiness::on_standby_sample`]).
    pub fn standby_sample(&self, holder: Option<i32>, valid_for: Duration) {
        self.progress()
            .readiness
            .on_standby_sample(holder, valid_for, Instant::now());
    }

    /// `Ok` with what the relay does when ready, else the reason (for `/readyz`).
    pub fn ready_state(&self) -> Result<Ready, String> {
        self.progress().readiness.state(Instant::now())
    }

    /// The role right now.
    pub fn role(&self) -> Role {
        self.progress().readiness.role(Instant::now())
    }

    /// The relay stopped for good (`reason` is what `/readyz` says from now on).
    pub fn fatal(&self, reason: String) {
        self.progress().readiness.set_fatal(reason);
    }

    /// Why the stream is down, as far as a sample can tell.
    pub fn down_because(&self, why: Option<String>) {
        self.progress().readiness.set_down_because(why);
    }

    /// Whether the replication stream is up.
    pub fn is_streaming(&self) -> bool {
        self.progress().readiness.is_streaming()
    }

    /// A slot sample succeeded (its values go through [`Metrics::slot_sample`]).
    pub fn slot_sample_succeeded(&self) {
        *self
            .inner
            .ops
            .last_sample
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Instant::now());
    }

    /// Time since the last successful slot sample; `None` before the first.
    pub fn slot_sample_age(&self) -> Option<Duration> {
        let last = *self
            .inner
            .ops
            .last_sample
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        last.map(|at| at.elapsed())
    }

    /// A sample of the bookmark slots: one label per bookmark, the largest
    /// [`MAX_BOOKMARK_LABELS`] by retained WAL, the rest under `_other`.
    pub fn bookmarks(&self, samples: &[crate::status::BookmarkSample]) {
        let ops = &self.inner.ops;
        let mut state = ops
            .bookmarks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        state
            .first_seen
            .retain(|name, _| samples.iter().any(|s| &s.name == name));
        let mut rows: Vec<(String, u64, f64)> = samples
            .iter()
            .map(|s| {
                let seen = *state.first_seen.entry(s.name.clone()).or_insert(now);
                let age = s
                    .inactive_seconds
                    .unwrap_or_else(|| now.saturating_duration_since(seen).as_secs_f64());
                (s.name.clone(), s.retained_bytes, age.max(0.0))
            })
            .collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        if rows.len() > MAX_BOOKMARK_LABELS {
            let rest = rows.split_off(MAX_BOOKMARK_LABELS);
            rows.push((
                super::OTHER_LABEL.to_string(),
                rest.iter().map(|r| r.1).sum(),
                rest.iter().map(|r| r.2).fold(0.0, f64::max),
            ));
        }
        let labels: Vec<BookmarkLabel> = rows
            .iter()
            .map(|r| BookmarkLabel {
                bookmark: r.0.clone(),
            })
            .collect();
        for gone in state.labels.iter().filter(|l| !labels.contains(l)) {
            ops.bookmark_retained.remove(gone);
            ops.bookmark_age.remove(gone);
        }
        for (label, (_, retained, age)) in labels.iter().zip(&rows) {
            ops.bookmark_retained
                .get_or_create(label)
                .set(i64::try_from(*retained).unwrap_or(i64::MAX));
            ops.bookmark_age.get_or_create(label).set(*age);
        }
        state.labels = labels;
    }

    /// A slot sample failed.
    pub fn slot_sample_failed(&self) {
        self.inner.ops.slot_sample_errors.inc();
    }

    pub(super) fn ops_on_scrape(&self) {
        let role = self.role();
        self.inner.ops.on_scrape(role, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::BookmarkSample;

    fn sample(name: &str, retained: u64, age: Option<f64>) -> BookmarkSample {
        BookmarkSample {
            name: name.to_string(),
            retained_bytes: retained,
            inactive_seconds: age,
        }
    }

    fn lines(m: &Metrics, metric: &str) -> Vec<String> {
        m.encode()
            .lines()
            .filter(|l| l.starts_with(&format!("{metric}{{")))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn bookmark_labels_are_bounded_and_follow_the_bookmarks() {
        let m = Metrics::new();
        let many: Vec<_> = (0..13u64)
            .map(|i| sample(&format!("b{i:02}"), 1000 + i, Some(i as f64)))
            .collect();
        m.bookmarks(&many);
        let retained = lines(&m, names::BOOKMARK_RETAINED_WAL_BYTES);
        assert_eq!(retained.len(), MAX_BOOKMARK_LABELS + 1, "{retained:#?}");
        // The three smallest are summed under _other; their ages are maxed.
        assert!(
            retained.contains(&format!(
                "{}{{bookmark=\"_other\"}} {}",
                names::BOOKMARK_RETAINED_WAL_BYTES,
                1000 + 1001 + 1002
            )),
            "{retained:#?}"
        );
        assert!(lines(&m, names::BOOKMARK_AGE_SECONDS)
            .iter()
            .any(|l| l.contains("bookmark=\"_other\"} 2")));
        // Dropped bookmarks disappear; an age unknown to the server (before 17)
        // counts from the first sample.
        m.bookmarks(&[sample("kept", 5, None)]);
        let retained = lines(&m, names::BOOKMARK_RETAINED_WAL_BYTES);
        assert_eq!(
            retained,
            [format!(
                "{}{{bookmark=\"kept\"}} 5",
                names::BOOKMARK_RETAINED_WAL_BYTES
            )]
        );
        let age = lines(&m, names::BOOKMARK_AGE_SECONDS);
        assert_eq!(age.len(), 1);
        assert!(age[0].contains("bookmark=\"kept\"} 0"), "{age:?}");
    }
}
