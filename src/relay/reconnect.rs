//! Reconnects: sessions one after another, from the slot, with jittered
//! backoff, until shut down or an error a human must fix (see
//! [`RelayError::disposition`]). A held slot means standing by.

use std::time::{Duration, Instant};

use rand::Rng;

use super::holder::terminate_stale_holder;
use super::{Disposition, Relay, RelayError, SessionEnd, HEALTHY_SESSION};

impl Relay {
    /// Stream until shut down or a fatal error.
    pub async fn run(self) -> Result<(), RelayError> {
        self.run_to_end().await.map(|_| ())
    }

    /// Like [`Relay::run`]; `Ok(true)` when [`StreamOptions::end_lsn`] was
    /// reached with everything acknowledged, `Ok(false)` when stopped before.
    pub async fn run_to_end(mut self) -> Result<bool, RelayError> {
        let min = self.cfg.relay.reconnect_backoff_min;
        let max = self.cfg.relay.reconnect_backoff_max;
        let mut backoff = min;
        loop {
            let began = Instant::now();
            let result = self.session().await;
            self.metrics.streaming(false);
            self.metrics.slot_held(false);
            let err = match result {
                Ok(end) => {
                    if let Some(sink) = self.sink.take() {
                        sink.close(Duration::from_secs(1)).await;
                    }
                    return Ok(matches!(end, SessionEnd::Finished));
                }
                Err(e) => e,
            };
            if err.disposition() == Disposition::Fatal {
                if let Some(sink) = self.sink.take() {
                    sink.close(Duration::from_secs(1)).await;
                }
                return Err(err);
            }
            self.metrics.reconnect();
            if err.rebuild_producer() {
                if let Some(sink) = self.sink.take() {
                    tracing::warn!("rebuilding the kafka producer");
                    self.metrics.producer_rebuild();
                    sink.close_for_rebuild(&self.shutdown).await;
                }
            }
            if began.elapsed() >= HEALTHY_SESSION {
                backoff = min;
            }
            let delay = if err.is_slot_busy() {
                // Standby: another relay streams from the slot (PostgreSQL allows
                // one consumer). Poll at a steady pace to take over within seconds.
                if self.cfg.relay.terminate_stale_holder {
                    terminate_stale_holder(&self.cfg).await;
                }
                tracing::info!(error = %err, "the slot is held by another process; standing by");
                self.cfg.relay.slot_busy_retry
            } else {
                // Full jitter between min and the current ceiling.
                let delay = rand::thread_rng().gen_range(min..=backoff.max(min));
                if matches!(err, RelayError::ServerShuttingDown { .. }) {
                    // Not a failure: the database restarts (logged when we let go).
                    tracing::info!(retry_in = ?delay, "resuming from the slot once PostgreSQL is back");
                } else {
                    tracing::warn!(error = %err, retry_in = ?delay, "replication session failed; resuming from the slot");
                }
                backoff = (backoff * 2).min(max);
                delay
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}
