//! The transport under a replication connection: a socket split into a framed,
//! cancellation-safe read half and a buffered write half.
//!
//! The socket is boxed behind [`Socket`]: plain TCP, a Unix socket, or TLS over
//! TCP as `sslmode` decides ([`negotiate_tls`]); the protocol code above does not
//! know which, except for the channel binding data SCRAM-SHA-256-PLUS needs.

use bytes::{Buf, BytesMut};
use futures_util::StreamExt;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::Decoder as _;
use tokio_util::codec::FramedRead;

use super::backend::BackendMessage;
use super::codec::BackendCodec;
use super::tls::{self, SslMode, TlsOptions};
use super::{ConnectConfig, ReplicationError, ServerError};

/// Anything that can carry the protocol: TCP, a Unix socket, later TLS.
pub(crate) trait Socket: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Socket for T {}

/// Read buffer of the framed reader. During catch-up the walsender sends
/// frames back to back; one read takes as many as fit, so a bigger buffer means
/// fewer syscalls and wake-ups per event (8 KiB, tokio-util's default, held
/// seven 1 KB events). 64 KiB is also the largest capacity `BytesMut` keeps
/// when it reallocates, and frames are slices of it that live only until the
/// producer has copied them.
const READ_BUFFER_BYTES: usize = 64 * 1024;

pub(crate) struct Connection {
    /// Frames survive a dropped `recv` future: a partly read message stays in
    /// the FramedRead buffer until the next poll completes it.
    reader: FramedRead<ReadHalf<Box<dyn Socket>>, BackendCodec>,
    writer: WriteHalf<Box<dyn Socket>>,
    /// Encoded frontend messages not yet written. Bytes stay here until the
    /// socket takes them, so a dropped `flush` future never tears a message:
    /// the rest goes out first on the next flush.
    out: BytesMut,
    /// `Some` when the socket is TLS.
    tls: Option<TlsSession>,
    /// The TCP socket's descriptor, for [`Connection::set_read_low_water`];
    /// `None` for a Unix socket. It belongs to the socket this connection
    /// owns, so it is open as long as `self` is.
    tcp_fd: Option<std::os::fd::RawFd>,
}

/// What SCRAM needs to know about a TLS session.
#[derive(Debug, Clone)]
pub(crate) struct TlsSession {
    /// `tls-server-end-point` data; `None` when the server certificate's signature
    /// algorithm has no defined hash.
    pub(crate) server_end_point: Option<Vec<u8>>,
}

impl Connection {
    /// Open the socket: TCP to `host:port` (TLS as `cfg.tls` says), or, when
    /// `host` is a directory (starts with `/`), the Unix socket
    /// `host/.s.PGSQL.port` as libpq does (never TLS, as with libpq).
    pub(crate) async fn open(cfg: &ConnectConfig) -> Result<Connection, ReplicationError> {
        let (socket, tls): (Box<dyn Socket>, _) = if cfg.host.starts_with('/') {
            let path = format!("{}/.s.PGSQL.{}", cfg.host.trim_end_matches('/'), cfg.port);
            let stream = tokio::net::UnixStream::connect(&path)
                .await
                .map_err(|source| ReplicationError::Connect { addr: path, source })?;
            (Box::new(stream), None)
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
            let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
            let (socket, tls) = negotiate_tls(stream, &cfg.tls).await?;
            let mut conn = Connection::new(socket, cfg.max_frame_bytes);
            conn.tls = tls;
            conn.tcp_fd = Some(fd);
            return Ok(conn);
        };
        let mut conn = Connection::new(socket, cfg.max_frame_bytes);
        conn.tls = tls;
        Ok(conn)
    }

    pub(crate) fn new(socket: Box<dyn Socket>, max_frame_bytes: usize) -> Connection {
        let (read, write) = tokio::io::split(socket);
        Connection {
            reader: FramedRead::with_capacity(
                read,
                BackendCodec::new(max_frame_bytes),
                READ_BUFFER_BYTES,
            ),
            writer: write,
            out: BytesMut::with_capacity(256),
            tls: None,
            tcp_fd: None,
        }
    }

    /// Ask the kernel not to report the socket readable until `bytes` are
    /// queued (`SO_RCVLOWAT`; 1 is the default), so a sender that writes many
    /// small messages does not wake the reader for each. Lowering it reports
    /// the socket readable at once if enough is queued (Linux re-checks on
    /// the change), so a caller that raises it must lower it again when it
    /// wants whatever is there. Best effort: a Unix socket has none (`Ok`,
    /// nothing done).
    pub(crate) fn set_read_low_water(&self, bytes: usize) -> std::io::Result<()> {
        let Some(fd) = self.tcp_fd else {
            return Ok(());
        };
        let value = libc::c_int::try_from(bytes.max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: `fd` is the descriptor of the TCP socket `self` owns (see
        // `tcp_fd`), so it is open; the option value is a live c_int whose
        // size is passed with it.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                std::ptr::addr_of!(value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// The TLS session, if the socket is TLS.
    pub(crate) fn tls(&self) -> Option<&TlsSession> {
        self.tls.as_ref()
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

    /// The next message if a whole one is already buffered, without touching
    /// the socket; `Ok(None)` when more bytes are needed. Lets the caller take a
    /// burst of frames from one read in one go instead of one wake-up each.
    pub(crate) fn try_recv_buffered(&mut self) -> Result<Option<BackendMessage>, ReplicationError> {
        // The codec is stateless (it only holds the frame cap), so decoding
        // from the reader's buffer with a copy of it is what the reader's
        // next poll would do; frames taken here are simply not there for it.
        let mut codec = self.reader.decoder().clone();
        loop {
            match codec.decode(self.reader.read_buffer_mut())? {
                None => return Ok(None),
                Some(BackendMessage::NoticeResponse(notice)) => log_notice(&notice),
                Some(message) => return Ok(Some(message)),
            }
        }
    }

    /// Close our side of the socket.
    pub(crate) async fn shutdown(&mut self) -> Result<(), ReplicationError> {
        self.writer.shutdown().await?;
        Ok(())
    }
}

/// `sslmode` on a fresh TCP connection: SSLRequest (or, with
/// `sslnegotiation=direct`, straight to the handshake), then the TLS handshake, or
/// plain TCP when the server declines and the mode allows it.
async fn negotiate_tls(
    mut tcp: TcpStream,
    opts: &TlsOptions,
) -> Result<(Box<dyn Socket>, Option<TlsSession>), ReplicationError> {
    if opts.mode == SslMode::Disable {
        return Ok((Box::new(tcp), None));
    }
    if !opts.direct {
        let mut request = BytesMut::with_capacity(8);
        frontend::ssl_request(&mut request);
        tcp.write_all(&request).await?;
        // Exactly one byte: anything the server sent after it must not be read
        // as if it came through TLS (CVE-2021-23222).
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {}
            b'N' if opts.mode.requires_tls() => {
                return Err(ReplicationError::Tls(format!(
                    "the server does not accept TLS connections, but sslmode={} requires TLS; \
                     enable ssl on the server, or lower sslmode in postgres.url",
                    opts.mode
                )))
            }
            b'N' => return Ok((Box::new(tcp), None)),
            other => {
                return Err(ReplicationError::Protocol(format!(
                    "the server answered the TLS request with {:?} instead of 'S' or 'N'",
                    char::from(other)
                )))
            }
        }
    }
    let config = tls::client_config(opts).map_err(|e| ReplicationError::Tls(e.0))?;
    let name = tls::server_name(opts).map_err(|e| ReplicationError::Tls(e.0))?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| handshake_error(e, opts))?;
    let server_end_point = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|cert| tls::tls_server_end_point(cert));
    Ok((Box::new(stream), Some(TlsSession { server_end_point })))
}

/// A TLS failure (certificate refused, protocol) needs an operator; an I/O error
/// during the handshake is a connection problem like any other.
fn handshake_error(e: std::io::Error, opts: &TlsOptions) -> ReplicationError {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls_error) => ReplicationError::Tls(tls::describe_handshake_error(tls_error, opts)),
        None => ReplicationError::Io(e),
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
