//! The reconnect loop: one session after another until shutdown, a finished
//! replay or a fatal error; between sessions a jittered exponential backoff
//! (reset by a healthy session), a steady standby pace while another process
//! holds the slot, and a rebuilt producer after its fatal errors. Also the
//! judgement that turns a decode error repeated at one position into a stop.

use std::time::{Duration, Instant};

use rand::Rng;

use crate::lsn::Lsn;

use super::holder::terminate_stale_holder;
use super::lifecycle::SessionEnd;
use super::{Disposition, Relay, RelayError, LOG_TARGET};

/// Sessions in a row that may fail to decode the same position before the
/// relay stops (the first failures may be a torn connection's doing).
const DECODE_RETRIES: u32 = 3;
/// A session that streamed this long resets the reconnect backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);

impl Relay {
    /// Stream until shut down or a fatal error.
    pub async fn run(self) -> Result<(), RelayError> {
        self.run_to_end().await.map(|_| ())
    }

    /// Like [`Relay::run`]; `Ok(true)` when [`super::StreamOptions::end_lsn`] was
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
                    tracing::warn!(target: LOG_TARGET, "rebuilding the kafka producer");
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
                tracing::info!(target: LOG_TARGET, error = %err, "the slot is held by another process; standing by");
                self.cfg.relay.slot_busy_retry
            } else {
                // Full jitter between min and the current ceiling.
                let delay = rand::thread_rng().gen_range(min..=backoff.max(min));
                if matches!(err, RelayError::ServerShuttingDown { .. }) {
                    // Not a failure: the database restarts (logged when we let go).
                    tracing::info!(target: LOG_TARGET, retry_in = ?delay, "resuming from the slot once PostgreSQL is back");
                } else {
                    tracing::warn!(target: LOG_TARGET, error = %err, retry_in = ?delay, "replication session failed; resuming from the slot");
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

    /// A decode error is retried (a reconnect may have been all it needed),
    /// but the same error at the same position session after session is the
    /// bytes themselves: stop after [`DECODE_RETRIES`] instead of looping.
    pub(super) fn judge_decode_failure(&mut self, e: RelayError, at: Lsn) -> RelayError {
        let RelayError::Decode(error) = e else {
            return e;
        };
        let times = match self.decode_failures {
            Some((lsn, n)) if lsn == at => n + 1,
            _ => 1,
        };
        self.decode_failures = Some((at, times));
        if times >= DECODE_RETRIES {
            RelayError::DecodeRepeated {
                lsn: at,
                times,
                error,
            }
        } else {
            RelayError::Decode(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::config::Config;
    use crate::pgoutput::DecodeError;

    #[test]
    fn gaps_and_repeated_decode_failures_are_fatal() {
        let gap = RelayError::SlotGap {
            gap: "gone".into(),
            loss: "lost".into(),
        };
        assert_eq!(gap.disposition(), Disposition::Fatal);
        let cfg = Config::default();
        let mut relay = Relay::new(cfg, CancellationToken::new());
        let decode = || RelayError::Decode(DecodeError::Empty);
        let at = Lsn(0x10);
        for _ in 1..DECODE_RETRIES {
            let e = relay.judge_decode_failure(decode(), at);
            assert_eq!(e.disposition(), Disposition::Retry, "{e}");
        }
        let e = relay.judge_decode_failure(decode(), at);
        assert!(matches!(e, RelayError::DecodeRepeated { .. }), "{e}");
        assert_eq!(e.disposition(), Disposition::Fatal);
        assert!(e.to_string().contains("0/10"), "{e}");
        // Another position starts the count again.
        let e = relay.judge_decode_failure(decode(), Lsn(0x20));
        assert_eq!(e.disposition(), Disposition::Retry);
    }
}
