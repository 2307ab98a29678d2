//! outbox-relay: the transactional outbox, relayed by change data capture.
//!
//! Applications insert events into an outbox table inside their business
//! transaction. The relay streams the table's inserts from a PostgreSQL
//! logical-replication slot (`pgoutput`), produces one Kafka record per row,
//! and confirms the slot position only after the broker acknowledged every
//! record up to it.
//!
//! # Data flow
//!
//! ```text
//!  PostgreSQL walsender ──CopyBoth──► replication   (wire client, frames)
//!                                          │ XLogData / keepalive
//!                                          ▼
//!                                      pgoutput      (pure decoder)
//!                                          │ Begin / Relation / Insert / Commit
//!                                          ▼
//!                       relay loop ──► outbox        (pure mapper: row → record)
//!                        │   ▲             │
//!                        │   │             ▼
//!                        │   │          kafka        (idempotent producer, acks=all)
//!                        │   └── delivery reports ◄──┘
//!                        ▼
//!                       ack             (pure tracker: which LSN may be confirmed)
//!                        │ flush LSN
//!                        └──► status update (`r`) ──► PostgreSQL moves the slot
//! ```
//!
//! # LSN invariants
//!
//! * The flush LSN sent to PostgreSQL is the Commit `end_lsn` of the last
//!   transaction (or a keepalive's `wal_end`) in the longest prefix of the
//!   stream whose records are all acknowledged by Kafka. It never passes an
//!   unacknowledged record and never exceeds what the server sent.
//! * It only moves forward within a session; each session restarts from the
//!   slot's confirmed position, so a crash replays (at-least-once), never skips.
//! * Status updates keep flowing while Kafka is slow or the window is full,
//!   so the walsender never times out because of back-pressure.
//!
//! # Modules
//!
//! | module | role | IO |
//! |---|---|---|
//! | [`lsn`] | `Lsn` and protocol timestamps, shared by all | none |
//! | [`pgoutput`] | pgoutput message decoder | none |
//! | [`ack`] | ack tracker: ordered queue of transactions and keepalive markers | none |
//! | [`outbox`] | row (or logical decoding message, [`outbox::message`]) → Kafka record mapping (Debezium EventRouter compatible) | none |
//! | [`envelope`] | CloudEvents 1.0 envelope (Kafka binding, binary/structured) over a mapped record | none |
//! | [`trace`] | W3C trace context (`traceparent` check) and the optional OTLP spans | OTLP/HTTP |
//! | [`replication`] | walsender wire client on `postgres-protocol` | PostgreSQL |
//! | [`kafka`] | rdkafka producer, delivery events, topic preparation | Kafka |
//! | [`setup`] | preflight checks, publication, slot state (ordinary SQL) | PostgreSQL |
//! | [`relay`] | the loop that wires them, error dispositions, reconnects | both |
//! | [`config`], [`cli`] | configuration (TOML < env < flags) and commands | none |
//! | [`demo`] | the one-command demo on librdkafka's mock cluster | both |

pub mod ack;
pub mod cli;
pub mod config;
pub mod demo;
pub mod envelope;
pub mod failover;
pub mod http;
pub mod kafka;
pub mod lsn;
pub mod metrics;
pub mod outbox;
pub mod pgoutput;
pub mod relay;
pub mod replay;
pub mod replication;
pub mod setup;
pub mod sql;
pub mod status;
pub mod trace;

pub use lsn::Lsn;
