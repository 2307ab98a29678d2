//! How one [`Layer`](super::Layer) lies over another, said once for every
//! section instead of field by field: a value the higher layer sets replaces
//! the lower one's whole (a list too), and string maps (`kafka.properties`,
//! `relay.poison_policy`) merge key by key, the higher layer winning per key.
//!
//! Each section struct is declared through [`overlay_section!`], which writes
//! its [`Overlay`] from its field list and gives every section the same
//! derives, unknown keys rejected included; a new setting needs no other line
//! here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Laying a higher layer's value (`top`) over a lower one's (`self`).
pub(super) trait Overlay {
    fn overlay(self, top: Self) -> Self;
}

/// Unset in the higher layer keeps the lower one's; set in both, the two
/// values meet by their own rule (a whole value: the higher one; a map: merged).
impl<T: Overlay> Overlay for Option<T> {
    fn overlay(self, top: Self) -> Self {
        match (self, top) {
            (Some(low), Some(high)) => Some(low.overlay(high)),
            (low, high) => high.or(low),
        }
    }
}

/// Key by key; the higher layer's value wins for a key both set.
impl Overlay for BTreeMap<String, String> {
    fn overlay(mut self, top: Self) -> Self {
        self.extend(top);
        self
    }
}

/// Types whose values a higher layer replaces whole.
macro_rules! replaced_whole {
    ($($t:ty),* $(,)?) => {
        $(impl Overlay for $t {
            fn overlay(self, top: Self) -> Self {
                top
            }
        })*
    };
}

replaced_whole!(
    String,
    bool,
    i32,
    usize,
    Duration,
    PathBuf,
    Vec<String>,
    super::TableName,
    super::PayloadFormat,
    super::LogFormat,
    super::KafkaSecurityProtocol,
    super::KafkaSaslMechanism,
    crate::envelope::EnvelopeMode,
);

/// Declares a struct of settings (a section, or the whole layer) as written,
/// with what every one of them has (`Clone`, `Default`, `PartialEq`, and
/// `Deserialize` with unknown keys rejected, serde naming the key and listing
/// the valid ones, and a missing key or table left unset), and its [`Overlay`]: field by field, each by its type's rule.
/// `Debug` is the caller's: derived, or written to redact secrets.
macro_rules! overlay_section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[$field_meta:meta])*
                pub $field:ident: $ty:ty,
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Default, PartialEq, serde::Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            $(
                $(#[$field_meta])*
                pub $field: $ty,
            )*
        }

        impl $crate::config::overlay::Overlay for $name {
            fn overlay(self, top: Self) -> Self {
                $name {
                    $($field: $crate::config::overlay::Overlay::overlay(self.$field, top.$field),)*
                }
            }
        }
    };
}

pub(super) use overlay_section;

#[cfg(test)]
mod tests {
    use super::super::{Layer, MappingLayer, RelayLayer};
    use super::*;

    fn policies(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn maps_merge_key_by_key_and_other_values_are_replaced_whole() {
        let low = Layer {
            relay: RelayLayer {
                poison_policy: policies(&[("*", "stop"), ("too_large", "dead-letter")]),
                dead_letter_topic: Some("low".into()),
                http_listen: Some("low:1".into()),
                ..Default::default()
            },
            mapping: MappingLayer {
                header_columns: Some(vec!["a".into(), "b".into()]),
                ..Default::default()
            },
            ..Default::default()
        };
        let top = Layer {
            relay: RelayLayer {
                poison_policy: policies(&[("*", "dead-letter"), ("bad_value", "stop")]),
                dead_letter_topic: Some("top".into()),
                ..Default::default()
            },
            mapping: MappingLayer {
                header_columns: Some(vec!["c".into()]),
                ..Default::default()
            },
            ..Default::default()
        };
        let both = low.clone().overlay(top.clone());
        assert_eq!(
            both.relay.poison_policy,
            policies(&[
                ("*", "dead-letter"),
                ("bad_value", "stop"),
                ("too_large", "dead-letter"),
            ])
        );
        assert_eq!(both.relay.dead_letter_topic.as_deref(), Some("top"));
        // Unset above: the lower layer's stays.
        assert_eq!(both.relay.http_listen.as_deref(), Some("low:1"));
        assert_eq!(both.mapping.header_columns, Some(vec!["c".to_string()]));
        // Nothing set above, or nothing below: the other side as it is.
        assert_eq!(low.clone().overlay(Layer::default()), low);
        assert_eq!(Layer::default().overlay(top.clone()), top);
    }
}
