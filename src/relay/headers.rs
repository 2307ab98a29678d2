//! Headers the relay itself puts on records, beside the mapper's: the replay
//! marker and the dead-letter diagnosis.

/// Header marking records re-published by `replay`.
pub const HEADER_REPLAY: &str = "replay";
/// Dead-letter headers: the poison class, the reason, the topic the row was for.
pub const HEADER_ERROR_CLASS: &str = "outbox-relay-error-class";
pub const HEADER_ERROR_REASON: &str = "outbox-relay-error-reason";
pub const HEADER_ORIGINAL_TOPIC: &str = "outbox-relay-original-topic";
