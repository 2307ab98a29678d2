//! The slot as PostgreSQL sees it, sampled over SQL for the lag gauges.
//!
//! A failed sample is retried at the next tick (the gauges keep their last
//! values and `outbox_relay_slot_sample_age_seconds` says how old they are);
//! the first failure of a streak logs a WARN, the recovery an INFO. If the
//! connection itself is gone, sampling stops here and the slot watcher
//! (`status::watch`, started by `run`) samples over a fresh connection.

use crate::metrics::{Metrics, ProgressLog};

use super::{LAG_SAMPLE_INTERVAL, PROGRESS_LOG_INTERVAL};

/// Samples the slot over SQL for the lag gauges, and writes the progress log.
pub(super) async fn sample_lag(
    client: crate::sql::SqlConnection,
    slot: String,
    our_pid: i32,
    metrics: Metrics,
) {
    let mut sample = tokio::time::interval(LAG_SAMPLE_INTERVAL);
    let mut progress = tokio::time::interval(PROGRESS_LOG_INTERVAL);
    progress.tick().await; // the first tick is immediate; skip it
    let mut log = ProgressLog::new();
    let mut failing = false;
    let mut sampling = true;
    loop {
        tokio::select! {
            _ = sample.tick(), if sampling => match crate::status::sample_lag(&client, &slot).await {
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
                    let error = crate::setup::describe_pg_error(&e);
                    if client.is_closed() {
                        tracing::warn!(%slot, %error, "lag sampling connection lost; the slot watcher samples instead");
                        sampling = false;
                    } else if !failing {
                        tracing::warn!(%slot, %error, retry_in = ?LAG_SAMPLE_INTERVAL, "lag sample failed; the slot gauges are stale until it works again");
                    }
                    failing = true;
                }
            },
            _ = progress.tick() => log.log(&metrics),
        }
    }
}
