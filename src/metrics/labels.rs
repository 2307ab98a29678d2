//! Label sets, and the cardinality bound: handles cached by label value, at
//! most a fixed number of values, the rest shared under [`OTHER_LABEL`].

use std::collections::HashMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;

use super::OTHER_LABEL;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct TopicLabel {
    pub(super) topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ClassLabel {
    pub(super) class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct StatusLabel {
    pub(super) status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct SystemLabel {
    pub(super) system_identifier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct VersionLabel {
    pub(super) version: &'static str,
}

/// The counters of one topic label value.
#[derive(Clone, Debug)]
pub(super) struct TopicCounters {
    pub(super) records: Counter,
    pub(super) bytes: Counter,
    pub(super) dead_lettered: Counter,
}

/// Handles by label value, at most `limit` of them, then one shared overflow
/// handle. Lookups by `&str` do not allocate.
#[derive(Debug)]
pub(super) struct BoundedLabels<H> {
    limit: usize,
    pub(super) by_value: HashMap<Box<str>, H>,
    other: Option<H>,
}

impl<H> BoundedLabels<H> {
    pub(super) fn new(limit: usize) -> Self {
        BoundedLabels {
            limit,
            by_value: HashMap::new(),
            other: None,
        }
    }

    /// Runs `f` on the handle of `value`, creating it with `make` (given the
    /// label value to use) the first time.
    pub(super) fn with<R>(
        &mut self,
        value: &str,
        make: impl FnOnce(&str) -> H,
        f: impl FnOnce(&H) -> R,
    ) -> R {
        if let Some(h) = self.by_value.get(value) {
            return f(h);
        }
        if self.by_value.len() < self.limit {
            let h = make(value);
            let r = f(&h);
            self.by_value.insert(value.into(), h);
            return r;
        }
        f(self.other.get_or_insert_with(|| make(OTHER_LABEL)))
    }
}
