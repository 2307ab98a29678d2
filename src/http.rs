//! The operator's HTTP listener (`--http-listen`, default `127.0.0.1:9187`):
//!
//! | path | answer |
//! |---|---|
//! | `/metrics` | Prometheus scrape, OpenMetrics text ([`crate::metrics::CONTENT_TYPE`]) |
//! | `/healthz` | `200 ok`: the process is alive and serving |
//! | `/readyz` | `200 ready`, `200 ready: standby; ...` while another process holds the slot, or `503 not ready: <reason>` (see [`crate::metrics::Readiness`]) |
//!
//! Anything else is a 404. The listener stops when the shutdown token is
//! cancelled, after answering the requests in progress.

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, Ready, CONTENT_TYPE};

/// Default of `--http-listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9187";

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr} for /metrics, /healthz and /readyz ({source}); choose a free address with --http-listen")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the HTTP listener on {addr} failed: {source}")]
    Serve {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds `addr`; call it before streaming starts so a taken port fails fast.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

/// Binds `addr` and serves until `shutdown` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), HttpError> {
    let listener = bind(addr).await?;
    serve_on(listener, metrics, shutdown).await
}

/// Serves on an already bound listener until `shutdown` is cancelled.
pub async fn serve_on(
    listener: TcpListener,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), HttpError> {
    let addr = listener.local_addr().map_err(|source| HttpError::Serve {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, router(metrics))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(|source| HttpError::Serve { addr, source })
}

/// The routes, for embedding or tests.
pub fn router(metrics: Metrics) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(metrics)
}

async fn metrics_handler(State(metrics): State<Metrics>) -> Response {
    // Encoding reads atomics and takes short locks only; no need to leave
    // the runtime thread.
    let body = metrics.encode();
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(metrics): State<Metrics>) -> Response {
    match metrics.ready_state() {
        Ok(Ready::Streaming) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Ready::Standby { holder_pid }) => {
            let holder = holder_pid.map_or(String::new(), |pid| format!(" (pid {pid})"));
            (
                StatusCode::OK,
                format!("ready: standby; another process holds the slot{holder}, this relay takes over when it is free\n"),
            )
                .into_response()
        }
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    use super::*;
    use crate::metrics::names;

    struct Reply {
        status: u16,
        headers: String,
        body: String,
    }

    async fn get(addr: SocketAddr, path: &str) -> Reply {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
            .await
            .expect("reply within 10 s")
            .unwrap();
        let raw = String::from_utf8(raw).expect("utf-8 reply");
        let (head, body) = raw.split_once("\r\n\r\n").expect("head and body");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status code");
        Reply {
            status,
            headers: head.to_ascii_lowercase(),
            body: body.to_string(),
        }
    }

    async fn start(
        metrics: Metrics,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            serve_on(listener, metrics, token)
                .await
                .expect("the listener runs until shutdown")
        });
        (addr, shutdown, task)
    }

    #[tokio::test]
    async fn endpoints_answer() {
        let metrics = Metrics::new();
        metrics.record_produced("orders", 42);
        let (addr, shutdown, task) = start(metrics.clone()).await;

        let r = get(addr, "/healthz").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));

        let r = get(addr, "/readyz").await;
        assert_eq!(r.status, 503);
        assert!(
            r.body
                .starts_with("not ready: the replication stream has not started"),
            "{}",
            r.body
        );
        // Another process holds the slot: a healthy standby is ready, and says so.
        metrics.standby_sample(Some(77), Duration::from_secs(60));
        let r = get(addr, "/readyz").await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.starts_with("ready: standby;"), "{}", r.body);
        assert!(r.body.contains("pid 77"), "{}", r.body);
        let r = get(addr, "/metrics").await;
        assert!(
            r.body.contains("outbox_relay_role{role=\"standby\"} 1"),
            "{}",
            r.body
        );

        metrics.streaming(true);
        let r = get(addr, "/readyz").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
        let r = get(addr, "/metrics").await;
        assert!(
            r.body.contains("outbox_relay_role{role=\"streaming\"} 1")
                && r.body.contains("outbox_relay_role{role=\"standby\"} 0"),
            "{}",
            r.body
        );

        let r = get(addr, "/metrics").await;
        assert_eq!(r.status, 200);
        assert!(
            r.headers.contains(
                "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"
            ),
            "{}",
            r.headers
        );
        let scrape = prometheus_parse::Scrape::parse(r.body.lines().map(|l| Ok(l.to_string())))
            .expect("the scrape parses");
        assert!(scrape
            .samples
            .iter()
            .any(|s| s.metric == names::PRODUCED_RECORDS_TOTAL
                && s.labels.get("topic") == Some("orders")));
        assert!(scrape.samples.iter().any(|s| s.metric == names::READY));
        assert!(r.body.ends_with("# EOF\n"));

        assert_eq!(get(addr, "/nope").await.status, 404);

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("listener stops on shutdown")
            .unwrap();
    }

    #[tokio::test]
    async fn bind_failure_names_the_address_and_the_flag() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = serve(addr, Metrics::new(), CancellationToken::new())
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, HttpError::Bind { .. }));
        assert!(msg.contains(&addr.to_string()), "{msg}");
        assert!(msg.contains("--http-listen"), "{msg}");
    }

    #[test]
    fn default_listen_address_parses() {
        let addr: SocketAddr = DEFAULT_LISTEN.parse().unwrap();
        assert_eq!(addr.port(), 9187);
        assert!(addr.ip().is_loopback());
    }
}
