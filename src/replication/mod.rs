//! The replication wire client: a thin walsender connection on `postgres-protocol`.
//!
//! Upstream `tokio-postgres` has no replication mode, so we own this part:
//! startup with `replication=database`, authentication, the simple-query
//! replication commands, and the CopyBoth sub-protocol. Ordinary SQL goes
//! through `tokio-postgres` elsewhere.
//!
//! (API fixed; implementation in progress)

use std::time::Duration;

use bytes::Bytes;

use crate::lsn::Lsn;

/// Where and how to open a replication connection.
#[derive(Clone)]
pub struct ConnectConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub application_name: String,
    pub connect_timeout: Duration,
    /// Largest CopyData / backend message accepted; bigger is an error, not an allocation.
    pub max_frame_bytes: usize,
}

impl std::fmt::Debug for ConnectConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("application_name", &self.application_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .finish()
    }
}

/// An `ErrorResponse` from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub severity: String,
    /// SQLSTATE, e.g. `55006`.
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("cannot connect to PostgreSQL at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connection to PostgreSQL timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("replication connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("PostgreSQL: {} (SQLSTATE {}){}", .0.message, .0.code, .0.hint.as_ref().map(|h| format!("; hint: {h}")).unwrap_or_default())]
    Server(ServerError),
    #[error("replication protocol violation: {0}")]
    Protocol(String),
    #[error("server sent a {size}-byte message, above the {max}-byte limit (raise max_frame_bytes if rows are really this large)")]
    FrameTooLarge { size: usize, max: usize },
    #[error("PostgreSQL closed the replication connection")]
    Closed,
}

/// The answer to `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifySystem {
    pub system_id: String,
    pub timeline: u32,
    pub xlogpos: Lsn,
    pub dbname: Option<String>,
}

/// The answer to `CREATE_REPLICATION_SLOT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    pub slot_name: String,
    pub consistent_point: Lsn,
    pub snapshot_name: Option<String>,
    pub output_plugin: Option<String>,
}

/// One CopyData payload from the walsender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// `w`: WAL data; `data` is one pgoutput message.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        send_time: i64,
        data: Bytes,
    },
    /// `k`: keepalive.
    Keepalive {
        wal_end: Lsn,
        send_time: i64,
        reply_requested: bool,
    },
}

/// A replication connection before streaming (simple-query mode).
pub struct ReplicationClient {
    _private: (),
}

impl ReplicationClient {
    pub async fn connect(_cfg: &ConnectConfig) -> Result<Self, ReplicationError> {
        todo!("in progress")
    }

    /// `server_version_num` (e.g. 150004), from the startup ParameterStatus.
    pub fn server_version_num(&self) -> u32 {
        todo!("in progress")
    }

    /// Backend process id of this connection (from BackendKeyData).
    pub fn backend_pid(&self) -> i32 {
        todo!("in progress")
    }

    pub async fn identify_system(&mut self) -> Result<IdentifySystem, ReplicationError> {
        todo!("in progress")
    }

    /// Run one simple query; rows as text columns.
    pub async fn simple_query(
        &mut self,
        _sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        todo!("in progress")
    }

    /// `CREATE_REPLICATION_SLOT "name" LOGICAL pgoutput` (+ `(SNAPSHOT 'nothing')` on PG15+).
    pub async fn create_logical_slot(
        &mut self,
        _slot: &str,
    ) -> Result<CreatedSlot, ReplicationError> {
        todo!("in progress")
    }

    /// `START_REPLICATION SLOT "slot" LOGICAL start (options)`, then CopyBoth.
    pub async fn start_logical_replication(
        self,
        _slot: &str,
        _start: Lsn,
        _options: &[(String, String)],
    ) -> Result<ReplicationStream, ReplicationError> {
        todo!("in progress")
    }
}

/// The CopyBoth stream.
pub struct ReplicationStream {
    _private: (),
}

impl ReplicationStream {
    /// Next message; `Ok(None)` when the server ended the copy. Cancellation-safe:
    /// may be raced in `select!` without losing or tearing a frame.
    pub async fn next_message(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        todo!("in progress")
    }

    /// Send a standby status update (`r`). The client time is taken now.
    pub async fn send_status_update(
        &mut self,
        _written: Lsn,
        _flushed: Lsn,
        _applied: Lsn,
        _reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        todo!("in progress")
    }

    /// Send CopyDone and wait (bounded) for the server to finish.
    pub async fn finish(self, _timeout: Duration) -> Result<(), ReplicationError> {
        todo!("in progress")
    }
}
