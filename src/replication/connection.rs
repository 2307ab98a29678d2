//! The transport under a replication connection: a socket split into a framed,
//! cancellation-safe read half and a buffered write half.
//!
//! The socket is boxed behind [`Socket`] so a TLS stream can slot in later
//! (sslmode, SCRAM-SHA-256-PLUS) without touching the protocol code above.

use bytes::{Buf, BytesMut};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

use super::backend::BackendMessage;
use super::codec::BackendCodec;
use super::{ConnectConfig, ReplicationError, ServerError};

/// Anything that can carry the protocol: TCP, a Unix socket, later TLS.
pub(crate) trait Socket: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Socket for T {}

pub(crate) struct Connection {
    /// Frames survive a dropped `recv` future: a partly read message stays in
    /// the FramedRead buffer until the next poll completes it.
    reader: FramedRead<ReadHalf<Box<dyn Socket>>, BackendCodec>,
    writer: WriteHalf<Box<dyn Socket>>,
    /// Encoded frontend messages not yet written. Bytes stay here until the
    /// socket takes them, so a dropped `flush` future never tears a message:
    /// the rest goes out first on the next flush.
    out: BytesMut,
}

impl Connection {
    /// Open the socket: TCP to `host:port`, or, when `host` is a directory
    /// (starts with `/`), the Unix socket `host/.s.PGSQL.port` as libpq does.
    pub(crate) async fn open(cfg: &ConnectConfig) -> Result<Connection, ReplicationError> {
        let socket: Box<dyn Socket> = if cfg.host.starts_with('/') {
            let path = format!("{}/.s.PGSQL.{}", cfg.host.trim_end_matches('/'), cfg.port);
            let stream = tokio::net::UnixStream::connect(&path)
                .await
                .map_err(|source| ReplicationError::Connect { addr: path, source })?;
            Box::new(stream)
        } else {
            let addr = format!("{}:{}", cfg.host, cfg.port);
            let stream = TcpStream::connect((cfg.host.as_str(), cfg.port))
                .await
                .map_err(|source| ReplicationError::Connect {
                    addr: addr.clone(),
                    source,
                })?;
            // Status updates are small and latency matters for them.
            stream
                .set_nodelay(true)
                .map_err(|source| ReplicationError::Connect { addr, source })?;
            Box::new(stream)
        };
        Ok(Connection::new(socket, cfg.max_frame_bytes))
    }

    pub(crate) fn new(socket: Box<dyn Socket>, max_frame_bytes: usize) -> Connection {
        let (read, write) = tokio::io::split(socket);
        Connection {
            reader: FramedRead::new(read, BackendCodec::new(max_frame_bytes)),
            writer: write,
            out: BytesMut::with_capacity(256),
        }
    }

    /// The outgoing buffer, for `postgres_protocol::message::frontend` encoders.
    pub(crate) fn out(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    /// Write everything buffered and flush the socket.
    pub(crate) async fn flush(&mut self) -> Result<(), ReplicationError> {
        while self.out.has_remaining() {
            let n = self.writer.write_buf(&mut self.out).await?;
            if n == 0 {
                return Err(ReplicationError::Io(std::io::ErrorKind::WriteZero.into()));
            }
        }
        self.writer.flush().await?;
        Ok(())
    }

    /// The next message, with notices logged and skipped. EOF is
    /// [`ReplicationError::Closed`]. Cancellation-safe.
    pub(crate) async fn recv(&mut self) -> Result<BackendMessage, ReplicationError> {
        loop {
            match self.reader.next().await {
                None => return Err(ReplicationError::Closed),
                Some(Err(e)) => return Err(e),
                Some(Ok(BackendMessage::NoticeResponse(notice))) => log_notice(&notice),
                Some(Ok(message)) => return Ok(message),
            }
        }
    }

    /// Close our side of the socket.
    pub(crate) async fn shutdown(&mut self) -> Result<(), ReplicationError> {
        self.writer.shutdown().await?;
        Ok(())
    }
}

fn log_notice(notice: &ServerError) {
    if notice.severity == "WARNING" {
        tracing::warn!(
            code = %notice.code,
            detail = ?notice.detail,
            hint = ?notice.hint,
            "postgres warning: {}",
            notice.message
        );
    } else {
        tracing::info!(
            severity = %notice.severity,
            code = %notice.code,
            detail = ?notice.detail,
            hint = ?notice.hint,
            "postgres notice: {}",
            notice.message
        );
    }
}
