//! The slot as PostgreSQL sees it, sampled over SQL for the lag gauges.
//!
//! A failed sample is retried at the next tick (the gauges keep their last
//! values and `outbox_relay_slot_sample_age_seconds` says how old they are);
//! the first failure of a streak logs a WARN, the recovery an INFO.
//!
//! Each sample opens its own connection and closes it: a connection held
//! open between samples would keep a smart shutdown (`pg_ctl stop -m smart`
//! waits for every client session) from ever starting. A connection refused
//! because the server is shutting down is passed on to the session, which
//! lets go of its stream then (see `letgo`): that is how a relay that is not
//! reading the stream (window full, broker hung) learns of a shutdown.

use tokio::sync::watch;

use crate::config::PostgresConfig;
use crate::metrics::{Metrics, ProgressLog};

use super::{LAG_SAMPLE_INTERVAL, PROGRESS_LOG_INTERVAL};

/// Samples the slot over SQL for the lag gauges, and writes the progress log.
pub(super) async fn sample_lag(
    pg: PostgresConfig,
    our_pid: i32,
    metrics: Metrics,
    server_stopping: watch::Sender<bool>,
) {
    let slot = pg.slot.clone();
    let mut sample = tokio::time::interval(LAG_SAMPLE_INTERVAL);
    let mut progress = tokio::time::interval(PROGRESS_LOG_INTERVAL);
    progress.tick().await; // the first tick is immediate; skip it
    let mut log = ProgressLog::new();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = sample.tick() => {
                let client = match crate::sql::connect(&pg).await {
                    Ok(c) => c,
                    Err(e) => {
                        metrics.slot_sample_failed();
                        let shutting_down = matches!(&e, crate::sql::SqlConnectError::Postgres(pe)
                            if pe.as_db_error().is_some_and(|d| d.code().code() == "57P03" && d.message().contains("shutting down")));
                        if shutting_down {
                            server_stopping.send_replace(true);
                        }
                        if !failing {
                            tracing::warn!(%slot, error = %e, retry_in = ?LAG_SAMPLE_INTERVAL, "lag sample failed; the slot gauges are stale until it works again");
                        }
                        failing = true;
                        continue;
                    }
                };
                match crate::status::sample_lag(&client, &slot).await {
                    Ok(s) => {
                        metrics.slot_sample_succeeded();
                        if failing {
                            tracing::info!(%slot, "lag sampling works again");
                            failing = false;
                        }
                        match s {
                            Some(s) => {
                                metrics.slot_sample(&s);
                                metrics.slot_held(s.active_pid == Some(our_pid));
                            }
                            None => metrics.slot_held(false),
                        }
                        match crate::status::sample_bookmarks(&client, &slot).await {
                            Ok(b) => metrics.bookmarks(&b),
                            Err(e) => tracing::debug!(error = %e, "bookmark sample failed"),
                        }
                    }
                    Err(e) => {
                        metrics.slot_sample_failed();
                        if !failing {
                            let error = crate::setup::describe_pg_error(&e);
                            tracing::warn!(%slot, %error, retry_in = ?LAG_SAMPLE_INTERVAL, "lag sample failed; the slot gauges are stale until it works again");
                        }
                        failing = true;
                    }
                }
            },
            _ = progress.tick() => log.log(&metrics),
        }
    }
}
