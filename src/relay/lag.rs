//! The slot as PostgreSQL sees it, sampled over SQL for the lag gauges.

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
    loop {
        tokio::select! {
            _ = sample.tick() => match crate::status::sample_lag(&client, &slot).await {
                Ok(Some(s)) => {
                    metrics.slot_sample(&s);
                    metrics.slot_held(s.active_pid == Some(our_pid));
                }
                Ok(None) => metrics.slot_held(false),
                Err(e) => {
                    tracing::debug!(error = %e, "lag sample failed");
                    return;
                }
            },
            _ = progress.tick() => log.log(&metrics),
        }
    }
}
