//! outbox-relay: the transactional outbox, relayed by change data capture.
//!
//! (crate map and LSN invariants: filled in as the modules land)

pub mod ack;
pub mod config;
pub mod kafka;
pub mod lsn;
pub mod outbox;
pub mod pgoutput;
pub mod replication;

pub use lsn::Lsn;
