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

pub(super) struct OpsMetrics {
    role: [Gauge; Role::ALL.len()],
    slot_sample_age: Gauge<f64, AtomicU64>,
    slot_sample_errors: Counter,
    /// When the last slot sample succeeded.
    last_sample: std::sync::Mutex<Option<Instant>>,
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
        OpsMetrics {
            role,
            slot_sample_age,
            slot_sample_errors,
            last_sample: std::sync::Mutex::new(None),
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

    /// A slot sample failed.
    pub fn slot_sample_failed(&self) {
        self.inner.ops.slot_sample_errors.inc();
    }

    pub(super) fn ops_on_scrape(&self) {
        let role = self.role();
        self.inner.ops.on_scrape(role, Instant::now());
    }
}
