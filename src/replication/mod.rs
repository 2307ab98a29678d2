//! The replication wire client: a thin walsender connection on `postgres-protocol`.
//!
//! Upstream `tokio-postgres` has no replication mode, so we own this part:
//! startup with `replication=database`, authentication, the simple-query
//! replication commands, and the CopyBoth sub-protocol. Ordinary SQL goes
//! through `tokio-postgres` elsewhere.
//!
//! Files: `connection` (socket, framed reads, buffered writes), `codec`
//! (backend message framing, frame size limit), `backend` (backend message
//! bodies), `auth` (startup and authentication), `command` (replication
//! command text and result rows), `copy` (CopyData payloads `w`/`k`/`r`),
//! `tls` (sslmode on rustls, shared with the SQL connections; channel binding
//! data), `tests` (client and stream against a scripted in-memory server). This
//! file holds the public API.

mod auth;
mod backend;
mod codec;
mod command;
mod connection;
mod copy;
pub mod tls;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use postgres_protocol::message::frontend;

use self::backend::BackendMessage;
use self::connection::Connection;
use crate::lsn::{pg_now_micros, Lsn};

pub use self::tls::{ChannelBindingMode, RootCert, SslMode, TlsOptions};

/// Where and how to open a replication connection.
#[derive(Clone, Default)]
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
    /// sslmode, certificates and channel binding (the URL's `ssl*` parameters).
    pub tls: TlsOptions,
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
            .field("tls", &self.tls)
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
    /// TLS could not be set up, the server would not do it although sslmode
    /// requires it, or its certificate was refused: needs an operator.
    #[error("{0}")]
    Tls(String),
    #[error("PostgreSQL: {} (SQLSTATE {}){}", .0.message, .0.code, .0.hint.as_ref().map(|h| format!("; hint: {h}")).unwrap_or_default())]
    Server(ServerError),
    #[error("replication protocol violation: {0}")]
    Protocol(String),
    #[error("server sent a {size}-byte message, above the {max}-byte limit (raise max_frame_bytes if rows are really this large)")]
    FrameTooLarge { size: usize, max: usize },
    #[error("PostgreSQL closed the replication connection")]
    Closed,
    #[error("invalid replication slot name {0:?}: PostgreSQL allows only lower-case letters, digits and underscores, at most 63 characters")]
    InvalidSlotName(String),
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
    conn: Connection,
    /// The SASL mechanism that authenticated this session, if SASL did.
    sasl_mechanism: Option<&'static str>,
    server_version_num: u32,
    backend_pid: i32,
    parameters: HashMap<String, String>,
    /// A command was sent and its ReadyForQuery not read yet (its future was
    /// dropped, or it failed half-way): the connection is out of step.
    in_command: bool,
}

impl std::fmt::Debug for ReplicationClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationClient")
            .field("backend_pid", &self.backend_pid)
            .field("server_version_num", &self.server_version_num)
            .finish_non_exhaustive()
    }
}

impl ReplicationClient {
    /// Open the socket, start the session and authenticate; `connect_timeout`
    /// bounds all of it.
    pub async fn connect(cfg: &ConnectConfig) -> Result<Self, ReplicationError> {
        let (conn, session) = tokio::time::timeout(cfg.connect_timeout, async {
            let mut conn = Connection::open(cfg).await?;
            let session = auth::startup(&mut conn, cfg).await?;
            Ok::<_, ReplicationError>((conn, session))
        })
        .await
        .map_err(|_| ReplicationError::ConnectTimeout(cfg.connect_timeout))??;
        tracing::debug!(
            host = %cfg.host,
            port = cfg.port,
            backend_pid = session.backend_pid,
            server_version_num = session.server_version_num,
            tls = conn.tls().is_some(),
            auth = session.sasl_mechanism.unwrap_or("not SASL"),
            "replication connection ready"
        );
        Ok(ReplicationClient {
            sasl_mechanism: session.sasl_mechanism,
            conn,
            server_version_num: session.server_version_num,
            backend_pid: session.backend_pid,
            parameters: session.parameters,
            in_command: false,
        })
    }

    /// `server_version_num` (e.g. 150004), from the startup ParameterStatus.
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// Backend process id of this connection (from BackendKeyData).
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// Whether the connection is encrypted (TLS).
    pub fn is_tls(&self) -> bool {
        self.conn.tls().is_some()
    }

    /// `SCRAM-SHA-256-PLUS` (bound to the TLS channel) or `SCRAM-SHA-256` when the
    /// session authenticated with SASL; `None` for trust, password, md5, cert.
    pub fn sasl_mechanism(&self) -> Option<&'static str> {
        self.sasl_mechanism
    }

    /// A run-time parameter the server reported (ParameterStatus), e.g.
    /// `server_encoding`, `integer_datetimes`.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    pub async fn identify_system(&mut self) -> Result<IdentifySystem, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        command::parse_identify_system(&rows)
    }

    /// Run one simple query; rows as text columns. With several statements the
    /// rows of all of them are returned together. Not cancellation-safe: if the
    /// future is dropped, later commands fail and the client must reconnect.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        self.send_query(sql).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.conn.recv().await? {
                BackendMessage::DataRow(values) => {
                    if error.is_none() {
                        rows.push(text_row(values)?);
                    }
                }
                BackendMessage::ErrorResponse(e) => error = Some(e),
                BackendMessage::ReadyForQuery { .. } => break,
                BackendMessage::ParameterStatus { name, value } => {
                    self.parameters.insert(name, value);
                }
                BackendMessage::RowDescription { .. }
                | BackendMessage::CommandComplete { .. }
                | BackendMessage::EmptyQueryResponse
                | BackendMessage::NotificationResponse { .. } => {}
                BackendMessage::CopyInResponse => {
                    // Refuse; the server answers with an error, then ReadyForQuery.
                    frontend::copy_fail("outbox-relay does not send COPY data", self.conn.out())?;
                    self.conn.flush().await?;
                }
                other => return Err(other.unexpected("a simple query")),
            }
        }
        self.in_command = false;
        match error {
            Some(e) => Err(ReplicationError::Server(e)),
            None => Ok(rows),
        }
    }

    /// `CREATE_REPLICATION_SLOT "name" LOGICAL pgoutput` (+ `(SNAPSHOT 'nothing')` on PG15+,
    /// `NOEXPORT_SNAPSHOT` before). Waits for running transactions to finish.
    pub async fn create_logical_slot(
        &mut self,
        slot: &str,
    ) -> Result<CreatedSlot, ReplicationError> {
        self.create_logical_slot_with(slot, false).await
    }

    /// Like [`create_logical_slot`](Self::create_logical_slot); with `failover`
    /// on PostgreSQL 17+ the slot is a failover slot (`FAILOVER true`:
    /// synchronised to standbys that run `sync_replication_slots`). Ignored on
    /// older servers, which have no such slots.
    pub async fn create_logical_slot_with(
        &mut self,
        slot: &str,
        failover: bool,
    ) -> Result<CreatedSlot, ReplicationError> {
        let sql = command::create_logical_slot(slot, self.server_version_num, failover)?;
        let rows = self.simple_query(&sql).await?;
        command::parse_created_slot(&rows)
    }

    /// `TIMELINE_HISTORY tli`: the history file's text (which timeline forked
    /// from which, at what LSN).
    pub async fn timeline_history(&mut self, timeline: u32) -> Result<String, ReplicationError> {
        let rows = self
            .simple_query(&format!("TIMELINE_HISTORY {timeline}"))
            .await?;
        Ok(rows
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().nth(1).flatten())
            .unwrap_or_default())
    }

    /// `START_REPLICATION SLOT "slot" LOGICAL start (options)`, then CopyBoth.
    /// Option names are sent double-quoted and values single-quoted.
    pub async fn start_logical_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(String, String)],
    ) -> Result<ReplicationStream, ReplicationError> {
        let sql = command::start_logical_replication(slot, start, options)?;
        self.send_query(&sql).await?;
        loop {
            match self.conn.recv().await? {
                BackendMessage::CopyBothResponse => break,
                BackendMessage::ErrorResponse(e) => return Err(ReplicationError::Server(e)),
                BackendMessage::ParameterStatus { .. }
                | BackendMessage::NotificationResponse { .. } => {}
                other => return Err(other.unexpected("START_REPLICATION")),
            }
        }
        tracing::debug!(slot, start = %start, backend_pid = self.backend_pid, "replication streaming started");
        Ok(ReplicationStream {
            conn: self.conn,
            server_version_num: self.server_version_num,
            backend_pid: self.backend_pid,
            server_done: false,
        })
    }

    async fn send_query(&mut self, sql: &str) -> Result<(), ReplicationError> {
        if self.in_command {
            return Err(ReplicationError::Protocol(
                "an earlier command on this replication connection did not finish \
                 (its future was dropped or it failed); reconnect"
                    .into(),
            ));
        }
        let out = self.conn.out();
        let mark = out.len();
        if let Err(e) = frontend::query(sql, out) {
            // Do not leave half a message behind (e.g. the text had a NUL byte).
            out.truncate(mark);
            return Err(e.into());
        }
        self.in_command = true;
        self.conn.flush().await
    }
}

fn text_row(values: Vec<Option<Bytes>>) -> Result<Vec<Option<String>>, ReplicationError> {
    values
        .into_iter()
        .map(|v| {
            v.map(|b| {
                String::from_utf8(b.to_vec()).map_err(|_| {
                    ReplicationError::Protocol("a query result value is not UTF-8".into())
                })
            })
            .transpose()
        })
        .collect()
}

/// The CopyBoth stream.
pub struct ReplicationStream {
    conn: Connection,
    server_version_num: u32,
    backend_pid: i32,
    /// The server ended the copy (CopyDone, or CommandComplete when the
    /// walsender shuts down).
    server_done: bool,
}

impl std::fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("backend_pid", &self.backend_pid)
            .field("server_version_num", &self.server_version_num)
            .field("server_done", &self.server_done)
            .finish_non_exhaustive()
    }
}

impl ReplicationStream {
    /// Next message; `Ok(None)` when the server ended the copy. Cancellation-safe:
    /// may be raced in `select!` without losing or tearing a frame.
    pub async fn next_message(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        if self.server_done {
            return Ok(None);
        }
        // Cancellation safety: the only await is `recv`, which is; once it
        // yields a message, everything below completes without awaiting.
        loop {
            let message = self.conn.recv().await?;
            if let Some(result) = self.on_backend_message(message) {
                return result;
            }
        }
    }

    /// Do not wake the reader until `bytes` are queued on the socket (see
    /// `Connection::set_read_low_water`); `1` undoes it and reports at once
    /// whatever is queued.
    pub fn set_read_low_water(&self, bytes: usize) -> std::io::Result<()> {
        self.conn.set_read_low_water(bytes)
    }

    /// Like [`next_message`](Self::next_message), but only from bytes already
    /// read: `Ok(None)` when no whole message is buffered (or the copy ended;
    /// `next_message` then says which). Never waits.
    pub fn try_next_buffered(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        while !self.server_done {
            let Some(message) = self.conn.try_recv_buffered()? else {
                return Ok(None);
            };
            if let Some(result) = self.on_backend_message(message) {
                return result;
            }
        }
        Ok(None)
    }

    /// One backend message during streaming: `None` to skip it.
    fn on_backend_message(
        &mut self,
        message: BackendMessage,
    ) -> Option<Result<Option<ReplicationMessage>, ReplicationError>> {
        Some(match message {
            BackendMessage::CopyData(payload) => copy::parse_copy_data(payload).map(Some),
            BackendMessage::CopyDone | BackendMessage::CommandComplete { .. } => {
                self.server_done = true;
                Ok(None)
            }
            BackendMessage::ErrorResponse(e) => Err(ReplicationError::Server(e)),
            BackendMessage::ParameterStatus { .. }
            | BackendMessage::NotificationResponse { .. } => return None,
            other => Err(other.unexpected("replication streaming")),
        })
    }

    /// Send a standby status update (`r`). The client time is taken now.
    ///
    /// If this future is dropped before it completes, the update is not torn:
    /// its remaining bytes go out first on the next send.
    pub async fn send_status_update(
        &mut self,
        written: Lsn,
        flushed: Lsn,
        applied: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        let payload =
            copy::encode_status_update(written, flushed, applied, pg_now_micros(), reply_requested);
        frontend::CopyData::new(&payload[..])?.write(self.conn.out());
        self.conn.flush().await?;
        tracing::trace!(written = %written, flushed = %flushed, applied = %applied, reply_requested, "sent standby status update");
        Ok(())
    }

    /// Send CopyDone and wait (bounded) for the server to finish, then
    /// Terminate. WAL data still arriving meanwhile is discarded (it was never
    /// confirmed, so the slot sends it again next time). Send the final status
    /// update before calling this. If the server does not answer within
    /// `timeout`, the connection is dropped with a warning and `Ok` returned:
    /// nothing is lost by that.
    pub async fn finish(mut self, timeout: Duration) -> Result<(), ReplicationError> {
        match tokio::time::timeout(timeout, self.close()).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(
                    backend_pid = self.backend_pid,
                    ?timeout,
                    "walsender did not end the copy in time; dropping the connection"
                );
                Ok(())
            }
        }
    }

    /// Backend process id of the walsender.
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// `server_version_num` of the server (e.g. 150004).
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    async fn close(&mut self) -> Result<(), ReplicationError> {
        frontend::copy_done(self.conn.out());
        if let Err(e) = self.conn.flush().await {
            // The server may already be gone; what it sent before says why.
            tracing::debug!(error = %e, "could not send CopyDone");
        }
        let result = loop {
            match self.conn.recv().await {
                Ok(
                    BackendMessage::CopyData(_)
                    | BackendMessage::CopyDone
                    | BackendMessage::CommandComplete { .. }
                    | BackendMessage::ParameterStatus { .. }
                    | BackendMessage::NotificationResponse { .. },
                ) => {}
                Ok(BackendMessage::ReadyForQuery { .. }) | Err(ReplicationError::Closed) => {
                    break Ok(())
                }
                Ok(BackendMessage::ErrorResponse(e)) => break Err(ReplicationError::Server(e)),
                Ok(other) => break Err(other.unexpected("the end of streaming")),
                Err(e) => break Err(e),
            }
        };
        frontend::terminate(self.conn.out());
        // Best effort: the server may have closed the socket already.
        let _ = self.conn.flush().await;
        let _ = self.conn.shutdown().await;
        result
    }
}

#[cfg(test)]
mod tests;
