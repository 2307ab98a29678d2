//! Ordinary SQL connections (tokio-postgres) for checks, setup, status and lag
//! sampling. One place opens them, so transport security is decided once.

use tokio::task::JoinHandle;

use crate::config::{ConfigError, PostgresConfig};

/// A client plus the task driving its connection; dropping it closes both.
pub struct SqlConnection {
    pub client: tokio_postgres::Client,
    task: JoinHandle<()>,
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
}

/// Open an ordinary SQL connection as configured.
pub async fn connect(cfg: &PostgresConfig) -> Result<SqlConnection, SqlConnectError> {
    let config = cfg.sql_config()?;
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "sql connection ended");
        }
    });
    Ok(SqlConnection { client, task })
}
