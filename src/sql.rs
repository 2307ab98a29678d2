//! Ordinary SQL connections (tokio-postgres) for checks, setup, status and lag
//! sampling. One place opens them, so transport security is decided once: the
//! same `sslmode` semantics, certificates and channel binding as the replication
//! connection ([`crate::replication::tls`]), plugged into tokio-postgres as a
//! [`MakeTlsConnect`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use crate::config::{ConfigError, PostgresConfig, Problem, SessionAttrs};
use crate::replication::tls::{self, SslMode, TlsOptions};

/// A client plus the task driving its connection; dropping it closes both.
pub struct SqlConnection {
    pub client: tokio_postgres::Client,
    task: JoinHandle<()>,
    /// Which host of the URL (0-based) this connection reached.
    pub host: usize,
}

impl Drop for SqlConnection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::ops::Deref for SqlConnection {
    type Target = tokio_postgres::Client;

    fn deref(&self) -> &Self::Target {
        &self.client
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SqlConnectError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    /// Several hosts, none of them right for `target_session_attrs` (or none
    /// reachable): during a failover, until a standby is promoted.
    #[error("{0}")]
    NoServer(String),
}

/// Open an ordinary SQL connection as configured. With several hosts in the
/// URL they are tried in order and the first that satisfies
/// `target_session_attrs` is kept ([`SqlConnection::host`] says which); the
/// relay then pins the others to it ([`PostgresConfig::pinned_to`]).
pub async fn connect(cfg: &PostgresConfig) -> Result<SqlConnection, SqlConnectError> {
    let (targets, attrs) = cfg.sql_targets()?;
    let single = targets.len() == 1;
    let mut refused = Vec::new();
    let mut last = None;
    let mut wrong_role = false;
    for (i, (config, opts)) in targets.into_iter().enumerate() {
        let index = cfg.pinned_host.unwrap_or(i);
        let conn = match connect_one(&config, &opts).await {
            Ok(mut c) => {
                c.host = index;
                c
            }
            // One host: its own error, as before multi-host URLs.
            Err(e) if single && attrs == SessionAttrs::Any => return Err(e),
            Err(e) => {
                refused.push(format!("{}: {}", host_label(&config), describe(&e)));
                last = Some(e);
                continue;
            }
        };
        if attrs == SessionAttrs::Any {
            return Ok(conn);
        }
        match crate::failover::sql_role(&conn.client).await {
            Ok(role) if role.satisfies(attrs) => return Ok(conn),
            Ok(role) => {
                wrong_role = true;
                refused.push(format!("{}: {role}", host_label(&config)));
            }
            Err(e) => refused.push(format!(
                "{}: {}",
                host_label(&config),
                crate::setup::describe_pg_error(&e)
            )),
        }
    }
    // No server answered with the wrong role: the last connection error
    // keeps its own meaning (a refused password is fatal, a refused
    // connection retried), as with one host. A configuration error is the
    // same for every host.
    if !wrong_role {
        if let Some(e) = last {
            return Err(e);
        }
    }
    Err(SqlConnectError::NoServer(format!(
        "no server listed in postgres.url is {attrs}: {}",
        refused.join("; ")
    )))
}

/// A connection to host number `index` of the URL whatever its role (the
/// failover report reads the standbys of a `target_session_attrs=read-write`
/// URL).
pub async fn connect_host(
    cfg: &PostgresConfig,
    index: usize,
) -> Result<SqlConnection, SqlConnectError> {
    let (mut targets, _) = cfg.pinned_to(index).sql_targets()?;
    let (config, opts) = targets.swap_remove(0);
    let mut conn = connect_one(&config, &opts).await?;
    conn.host = index;
    Ok(conn)
}

fn host_label(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "?".into(),
    };
    format!(
        "{host}:{}",
        config.get_ports().first().copied().unwrap_or(5432)
    )
}

fn describe(e: &SqlConnectError) -> String {
    match e {
        SqlConnectError::Postgres(e) => crate::setup::describe_pg_error(e),
        other => other.to_string(),
    }
}

/// One connection to one server.
async fn connect_one(
    config: &tokio_postgres::Config,
    opts: &TlsOptions,
) -> Result<SqlConnection, SqlConnectError> {
    let (client, task) = if opts.mode == SslMode::Disable {
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        (client, spawn(connection))
    } else {
        let connector = RustlsConnect::new(opts).map_err(|e| {
            ConfigError::Invalid(vec![Problem::new(
                format!("PostgreSQL TLS: {e}"),
                "fix the sslrootcert / sslcert / sslkey paths in postgres.url, or the files' \
                 permissions",
            )])
        })?;
        let (client, connection) = config.connect(connector).await?;
        (client, spawn(connection))
    };
    Ok(SqlConnection {
        client,
        task,
        host: 0,
    })
}

/// A TLS handshake refused for a reason an operator must fix: the server
/// certificate (name, CA, expiry) or the client certificate.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsRefused(pub String);

/// Whether `e` is a TLS failure that retrying cannot fix: a certificate refused
/// by either side, or a server without TLS when `sslmode` requires it.
pub fn is_tls_refusal(e: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        // Ours, or tokio-postgres' own words when the server answers the
        // SSLRequest with 'N' under sslmode=require or stricter.
        if s.is::<TlsRefused>() || s.to_string() == "server does not support TLS" {
            return true;
        }
        source = s.source();
    }
    false
}

fn spawn<F>(connection: F) -> JoinHandle<()>
where
    F: Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "sql connection ended");
        }
    })
}

/// tokio-postgres' TLS hook on our rustls configuration. The certificate is
/// checked against `host` of the URL (as libpq does), whatever name
/// tokio-postgres passes.
#[derive(Clone)]
struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    opts: Arc<TlsOptions>,
}

impl RustlsConnect {
    fn new(opts: &TlsOptions) -> Result<Self, tls::TlsError> {
        Ok(RustlsConnect {
            config: tls::client_config(opts)?,
            name: tls::server_name(opts)?,
            opts: Arc::new(opts.clone()),
        })
    }
}

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, _domain: &str) -> Result<RustlsConnect, io::Error> {
        Ok(self.clone())
    }
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, Self::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let connector = tokio_rustls::TlsConnector::from(self.config);
            let tls = connector.connect(self.name, stream).await.map_err(|e| {
                match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    Some(t) => Box::new(TlsRefused(tls::describe_handshake_error(t, &self.opts)))
                        as Self::Error,
                    None => Box::new(e) as Self::Error,
                }
            })?;
            let end_point = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|cert| tls::tls_server_end_point(cert));
            Ok(RustlsStream { tls, end_point })
        })
    }
}

/// A TLS stream that can tell tokio-postgres its channel binding data, so it
/// chooses SCRAM-SHA-256-PLUS when the server offers it.
struct RustlsStream<S> {
    tls: tokio_rustls::client::TlsStream<S>,
    end_point: Option<Vec<u8>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        match &self.end_point {
            Some(hash) => ChannelBinding::tls_server_end_point(hash.clone()),
            None => ChannelBinding::none(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}
