//! The slot watcher: a light task beside `run` that samples the slot over its
//! own SQL connection whenever the relay's session does not:
//!
//! * **Standby.** While this relay does not stream and another backend does,
//!   it is a standby: the sample tells readiness so (`/readyz` 200 "standby",
//!   `outbox_relay_role{role="standby"}`), and the slot gauges stay current
//!   (lag, retained WAL, `wal_status`: a slot invalidated while the other relay
//!   streamed shows `lost` here).
//! * **Stale sampler.** While this relay streams, the session's own sampler
//!   feeds the gauges; if its samples stop (its connection broke), the watcher
//!   samples instead, reconnecting as needed, so the gauges never freeze.
//!
//! Failures are retried every period; the first of a streak logs a WARN, the
//! recovery an INFO.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::PostgresConfig;
use crate::metrics::Metrics;
use crate::sql::{self, SqlConnection};

/// How long a relay that stops on an invalidated slot keeps serving
/// `/metrics` (`wal_status="lost"`) and `/readyz` (503, the reason): two
/// scrapes at Prometheus' default 15 s interval, with margin.
pub const LOST_SLOT_LINGER: Duration = Duration::from_secs(40);

/// How long one standby sample counts, in sampling periods: a standby whose
/// samples fail for this long is not ready any more.
const VALID_PERIODS: u32 = 3;

/// The session's own sampler runs every 5 s; after this long without a
/// successful sample the watcher samples while streaming too.
const STALE_AFTER: Duration = Duration::from_secs(15);

/// Samples `pg.slot` every `period` until `stop` (see the module documentation).
pub async fn watch_slot(
    pg: PostgresConfig,
    period: Duration,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let valid_for = period * VALID_PERIODS + Duration::from_secs(1);
    let mut conn: Option<SqlConnection> = None;
    let mut failing = false;
    let mut senders_busy = false;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let streaming = metrics.is_streaming();
        if streaming
            && metrics
                .slot_sample_age()
                .is_some_and(|age| age < STALE_AFTER)
        {
            // The session samples; free our connection.
            conn = None;
            continue;
        }
        match sample(&pg, &mut conn, &metrics, streaming).await {
            Ok(holder) => {
                if failing {
                    tracing::info!(slot = %pg.slot, "slot sampling works again");
                    failing = false;
                }
                if !streaming {
                    metrics.standby_sample(holder, valid_for);
                }
                // Not streaming and nobody else is: say why if the server
                // knows (the session retries SQLSTATE 53300 until a sender is free).
                let busy = match (&conn, streaming || holder.is_some()) {
                    (Some(c), false) => wal_senders_busy(c).await,
                    _ => None,
                };
                if busy.is_some() && !senders_busy {
                    tracing::warn!(slot = %pg.slot, reason = busy.as_deref().unwrap_or_default(), "the relay cannot start streaming");
                }
                senders_busy = busy.is_some();
                metrics.down_because(busy);
            }
            Err(e) => {
                metrics.slot_sample_failed();
                if !streaming {
                    metrics.standby_sample(None, valid_for);
                }
                if !failing {
                    tracing::warn!(slot = %pg.slot, error = %e, retry_in = ?period, "cannot sample the slot over SQL; the slot gauges are stale until it works again");
                    failing = true;
                }
                conn = None;
            }
        }
    }
}

/// One sample; `Ok(Some(pid))` when another backend streams from the slot.
async fn sample(
    pg: &PostgresConfig,
    conn: &mut Option<SqlConnection>,
    metrics: &Metrics,
    streaming: bool,
) -> Result<Option<i32>, String> {
    if conn.as_ref().map_or(true, |c| c.is_closed()) {
        *conn = Some(sql::connect(pg).await.map_err(|e| match e {
            sql::SqlConnectError::Postgres(e) => crate::setup::describe_pg_error(&e),
            other => other.to_string(),
        })?);
    }
    let client = conn.as_ref().expect("connected just above");
    let sample = crate::status::sample_lag(client, &pg.slot)
        .await
        .map_err(|e| crate::setup::describe_pg_error(&e))?;
    metrics.slot_sample_succeeded();
    let bookmarks = crate::status::sample_bookmarks(client, &pg.slot)
        .await
        .map_err(|e| crate::setup::describe_pg_error(&e))?;
    metrics.bookmarks(&bookmarks);
    Ok(match sample {
        Some(s) => {
            metrics.slot_sample(&s);
            // While streaming, the active backend is our own session.
            if streaming {
                None
            } else {
                s.active_pid.filter(|_| s.active)
            }
        }
        None => None,
    })
}

/// After a fatal error: if the slot is invalidated (`wal_status = 'lost'`),
/// show it on the metrics and in `/readyz`, and keep serving them for
/// [`LOST_SLOT_LINGER`] (or until `stop`), so the `OutboxRelaySlotLost` alert
/// gets its scrape before the process exits. Anything else returns at once.
pub async fn linger_if_slot_lost(pg: &PostgresConfig, metrics: &Metrics, stop: CancellationToken) {
    let Ok(conn) = sql::connect(pg).await else {
        return;
    };
    let Ok(Some(s)) = crate::status::sample_lag(&conn, &pg.slot).await else {
        return;
    };
    drop(conn);
    if s.wal_status.as_deref() != Some("lost") {
        return;
    }
    metrics.slot_sample(&s);
    metrics.slot_sample_succeeded();
    metrics.fatal(format!(
        "slot {} is invalidated (wal_status = lost): events may be missing; drop it, let the relay create a new one, and backfill with table replay",
        pg.slot
    ));
    tracing::info!(slot = %pg.slot, linger = ?LOST_SLOT_LINGER, "serving /metrics a little longer so the invalidated slot is scraped");
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(LOST_SLOT_LINGER) => {}
    }
}

/// `Some(reason)` when every WAL sender is taken (what SQLSTATE 53300, "number
/// of requested standby connections exceeds max_wal_senders", means), counted
/// with `pg_stat_get_wal_senders()`, which lists every walsender to any role.
async fn wal_senders_busy(client: &SqlConnection) -> Option<String> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_stat_get_wal_senders()), \
             current_setting('max_wal_senders')::int8",
            &[],
        )
        .await
        .ok()?;
    let (used, max): (i64, i64) = (row.get(0), row.get(1));
    (used >= max).then(|| {
        format!(
            "all {max} WAL senders (max_wal_senders) are busy, so PostgreSQL refuses the \
             replication connection (SQLSTATE 53300) and the relay retries until one is free; \
             raise max_wal_senders (restart) or stop an unused replication client"
        )
    })
}
