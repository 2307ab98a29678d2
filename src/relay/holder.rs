//! Taking over a slot from a relay that died with its connection half-open.

use std::time::Duration;

use crate::config::Config;

/// The configured limit, floored at the server's silence allowance.
fn stale_limit(configured: Duration, wal_sender_timeout: Option<Duration>) -> Duration {
    super::facts::silence_limit(wal_sender_timeout)
        .map_or(configured, |floor| configured.max(floor))
}

/// The slot is held: if the holder is a walsender carrying our
/// application_name that has sent no status reply for `stale_holder_timeout`
/// (the half-open connection of a relay that died), terminate it. A live relay
/// replies every status interval, so it is never taken for stale, except while
/// its walsender is busy decoding and reads no replies: `reply_time` then goes
/// stale for up to `wal_sender_timeout`, so the limit is never below that
/// plus the margin the relay itself allows ([`super::facts::silence_limit`]).
pub(super) async fn terminate_stale_holder(cfg: &Config) {
    let Ok(client) = crate::sql::connect(&cfg.postgres).await else {
        return;
    };
    let row = client
        .query_opt(
            "SELECT s.active_pid, r.application_name, \
                    extract(epoch FROM now() - coalesce(r.reply_time, r.backend_start))::float8, \
                    (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout') \
             FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = $1",
            &[&cfg.postgres.slot],
        )
        .await;
    let Ok(Some(row)) = row else { return };
    let pid: i32 = row.get(0);
    let app: Option<String> = row.get(1);
    let silent_for: f64 = row.get(2);
    let wal_sender_timeout = row
        .get::<_, Option<i64>>(3)
        .and_then(|ms| u64::try_from(ms).ok())
        .filter(|&ms| ms > 0)
        .map(Duration::from_millis);
    let limit = stale_limit(cfg.relay.stale_holder_timeout, wal_sender_timeout);
    if app.as_deref() != Some(cfg.postgres.application_name.as_str())
        || silent_for < limit.as_secs_f64()
    {
        return;
    }
    match client
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
    {
        Ok(_) => tracing::warn!(
            pid,
            silent_for_s = silent_for,
            "terminated a stale walsender holding the slot under our application_name"
        ),
        Err(e) => {
            tracing::warn!(pid, error = %crate::setup::describe_pg_error(&e), "cannot terminate the stale walsender holding the slot")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_is_stale_only_past_the_servers_own_timeout() {
        let s = Duration::from_secs;
        // 30 s configured, 180 s on the server: a busy walsender may not read
        // replies for 180 s, so wait past it.
        assert_eq!(stale_limit(s(30), Some(s(180))), s(225));
        assert_eq!(stale_limit(s(300), Some(s(60))), s(300));
        // No timeout on the server: the configured limit alone.
        assert_eq!(stale_limit(s(30), None), s(30));
    }
}
